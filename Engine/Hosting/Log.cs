using Microsoft.Extensions.Logging;

namespace DeepSeekCuda.Hosting;

internal static partial class Log
{
    [LoggerMessage(EventId = 1, Level = LogLevel.Information, Message = "Generation started: model {ModelId}, {PromptTokens} prompt tokens, max {MaxTokens} tokens, temperature {Temperature}")]
    public static partial void GenerationStarted(ILogger logger, string modelId, int promptTokens, int? maxTokens, float temperature);

    [LoggerMessage(EventId = 2, Level = LogLevel.Information, Message = "Generation finished ({FinishReason}): {PromptTokens} prompt tokens, {GeneratedTokens} generated in {ElapsedSeconds:F2} s, time to first token {TimeToFirstTokenSeconds:F2} s, {TokensPerSecond:F2} tokens/s")]
    public static partial void GenerationFinished(ILogger logger, string finishReason, int promptTokens, int generatedTokens, double elapsedSeconds, double timeToFirstTokenSeconds, double tokensPerSecond);

    [LoggerMessage(EventId = 3, Level = LogLevel.Warning, Message = "Generation ended early (cancelled or failed) after {GeneratedTokens} tokens and {ElapsedSeconds:F2} s")]
    public static partial void GenerationAborted(ILogger logger, int generatedTokens, double elapsedSeconds);

    [LoggerMessage(EventId = 4, Level = LogLevel.Debug, Message = "Waiting for a batch slot: {MaxBatch} requests are running")]
    public static partial void WaitingForSlot(ILogger logger, int maxBatch);

    [LoggerMessage(EventId = 5, Level = LogLevel.Information, Message = "Context length {Tokens} tokens per request: {Reason}")]
    public static partial void ContextChosen(ILogger logger, int tokens, string reason);

    [LoggerMessage(EventId = 6, Level = LogLevel.Information, Message = "Devices: {Count} ({Devices})")]
    public static partial void DevicesOpened(ILogger logger, int count, string devices);

    [LoggerMessage(EventId = 7, Level = LogLevel.Information, Message = "Placement {Placement} over {Count} devices ({Why}): {GibPerDevice} GiB of weights per device")]
    public static partial void PlacementChosen(ILogger logger, string placement, int count, string why, string gibPerDevice);

    [LoggerMessage(EventId = 8, Level = LogLevel.Information, Message = "Cache pool: {Blocks} blocks ({Tokens} tokens) shared by up to {MaxBatch} requests of at most {MaxTokensPerRequest} tokens: {Why}")]
    public static partial void CachePool(ILogger logger, int blocks, long tokens, int maxBatch, int maxTokensPerRequest, string why);
}

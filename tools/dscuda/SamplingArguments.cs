using System.CommandLine;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Inference;
using Microsoft.Extensions.AI;

namespace DeepSeekCuda.Cli;

/// <summary>Sampling options shared by <c>generate</c> and <c>chat</c>, mapped to <see cref="ChatOptions"/>.</summary>
internal sealed class SamplingArguments
{
    private readonly Option<int> _maxTokens = new("--max-tokens") { Description = "Most tokens to generate", DefaultValueFactory = _ => 200 };
    private readonly Option<float?> _temperature = new("--temperature") { Description = "0 for greedy; default 0.6 (R1's recommendation)" };
    private readonly Option<float?> _topP = new("--top-p") { Description = "Nucleus sampling mass; default 0.95" };
    private readonly Option<int?> _topK = new("--top-k") { Description = "Sample among the k most likely tokens" };
    private readonly Option<long?> _seed = new("--seed") { Description = "Seed for reproducible sampling" };
    private readonly Option<string[]> _stop = new("--stop") { Description = "Stop sequence (repeatable)", AllowMultipleArgumentsPerToken = false };

    public void AddTo(Command command)
    {
        command.Add(_maxTokens);
        command.Add(_temperature);
        command.Add(_topP);
        command.Add(_topK);
        command.Add(_seed);
        command.Add(_stop);
    }

    public ChatOptions ToChatOptions(ParseResult parse)
    {
        var maxTokens = parse.GetValue(_maxTokens);
        if (maxTokens < 1)
        {
            throw new UserErrorException($"--max-tokens must be at least 1, is {maxTokens}");
        }

        var stops = parse.GetValue(_stop);

        // Checked here, before the model is loaded (minutes for a real checkpoint), by the same rules the
        // chat client applies, and reported as one line naming the flag.
        var check = new SamplingOptions
        {
            Temperature = parse.GetValue(_temperature),
            TopP = parse.GetValue(_topP),
            TopK = parse.GetValue(_topK),
            MaxTokens = maxTokens,
            StopSequences = stops,
        };
        try
        {
            check.Validate();
        }
        catch (ArgumentException e)
        {
            var (flag, value) = e.ParamName switch
            {
                nameof(SamplingOptions.Temperature) => ("--temperature", (object?)check.Temperature),
                nameof(SamplingOptions.TopP) => ("--top-p", check.TopP),
                nameof(SamplingOptions.TopK) => ("--top-k", check.TopK),
                nameof(SamplingOptions.StopSequences) => ("--stop", "\"\""),
                _ => ("--max-tokens", maxTokens),
            };
            throw new UserErrorException($"{flag} {value}: {e.Reason()}");
        }

        return new ChatOptions
        {
            MaxOutputTokens = maxTokens,
            Temperature = parse.GetValue(_temperature),
            TopP = parse.GetValue(_topP),
            TopK = parse.GetValue(_topK),
            Seed = parse.GetValue(_seed),
            StopSequences = stops is { Length: > 0 } ? [.. stops] : null,
        };
    }
}

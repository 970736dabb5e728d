using System.Buffers;
using System.Text;
using System.Text.Json;
using Microsoft.AspNetCore.Http;
using DeepSeekCuda.Hosting;
using DeepSeekCuda.Inference;
using Microsoft.Extensions.AI;
using Microsoft.Extensions.Logging;

namespace DeepSeekCuda.Cli.Server;

/// <summary>
/// <c>POST /v1/chat/completions</c>: validates the body, runs its <c>n</c> choices as requests of the chat client
/// (so of its continuous-batching scheduler), and answers as OpenAI does, whole or as server-sent events.
/// </summary>
/// <remarks>
/// Every choice runs under <see cref="HttpContext.RequestAborted"/>: a client that goes away cancels its requests,
/// which returns their cache blocks. A streamed response starts only after every choice produced its first update,
/// so a request refused by the engine (a prompt over the context) is still a 400, not a broken stream.
/// </remarks>
internal sealed class ChatCompletionsEndpoint(IChatClient client, string modelId, ILogger logger)
{
    private const string Fingerprint = "dscuda";

    public async Task HandleAsync(HttpContext context)
    {
        ChatCompletionRequest request;
        try
        {
            using var body = await JsonDocument.ParseAsync(context.Request.Body, new JsonDocumentOptions { AllowDuplicateProperties = false }, context.RequestAborted);
            request = ChatCompletionRequest.Parse(body.RootElement, modelId);
        }
        catch (JsonException e)
        {
            throw new OpenAIErrorException(StatusCodes.Status400BadRequest, $"the body is not valid JSON: {e.Message}", null, "invalid_json");
        }

        var id = "chatcmpl-" + Guid.NewGuid().ToString("N");
        var created = DateTimeOffset.UtcNow.ToUnixTimeSeconds();
        // One failed choice ends its siblings too: the response cannot be completed.
        using var abort = CancellationTokenSource.CreateLinkedTokenSource(context.RequestAborted);
        if (request.Stream)
        {
            await StreamAsync(context, request, id, created, abort);
        }
        else
        {
            await CompleteAsync(context, request, id, created, abort);
        }
    }

    /// <summary>Maps what the engine throws before any output to the client's error.</summary>
    public static OpenAIErrorException? FromEngine(Exception e) => e switch
    {
        OpenAIErrorException o => o,
        // After our validation the engine's own checks are the prompt's (empty, over the context) and, as a second
        // line, the sampling options'; the message keeps its first line without .NET's "(Parameter ...)" tail.
        ArgumentException a => new OpenAIErrorException(StatusCodes.Status400BadRequest, a.Reason(),
            a.ParamName switch
            {
                nameof(SamplingOptions.Temperature) => "temperature",
                nameof(SamplingOptions.TopP) => "top_p",
                nameof(SamplingOptions.TopK) => "top_k",
                nameof(SamplingOptions.MaxTokens) => "max_tokens",
                nameof(SamplingOptions.StopSequences) => "stop",
                _ => "messages",
            },
            a.Message.Contains("the context holds", StringComparison.Ordinal) ? "context_length_exceeded" : null),
        // Tools and penalties were checked here already; what the engine still refuses is a schema it cannot enforce.
        NotSupportedException n => new OpenAIErrorException(StatusCodes.Status400BadRequest, n.Message,
            n.Message.Contains(nameof(ChatOptions.ResponseFormat), StringComparison.Ordinal) ? "response_format" : null,
            "unsupported_parameter"),
        _ => null,
    };

    private async Task CompleteAsync(HttpContext context, ChatCompletionRequest request, string id, long created, CancellationTokenSource abort)
    {
        var choices = Enumerable.Range(0, request.N).Select(async i =>
        {
            try
            {
                return await client.GetResponseAsync(request.Messages, request.OptionsFor(i), abort.Token);
            }
            catch
            {
                await abort.CancelAsync();
                throw;
            }
        }).ToArray();
        ChatResponse[] responses;
        try
        {
            responses = await Task.WhenAll(choices);
        }
        catch (Exception) when (!context.RequestAborted.IsCancellationRequested)
        {
            // The first real failure, not a sibling's cancellation.
            var first = choices.Where(t => t.IsFaulted).Select(t => t.Exception!.InnerException!).FirstOrDefault(e => e is not OperationCanceledException);
            if (first is null)
            {
                throw;
            }

            throw FromEngine(first) ?? first;
        }

        context.Response.ContentType = "application/json";
        await using (var json = new Utf8JsonWriter(context.Response.BodyWriter))
        {
            json.WriteStartObject();
            WriteHeader(json, id, "chat.completion", created);
            json.WriteStartArray("choices");
            for (var i = 0; i < responses.Length; i++)
            {
                var contents = responses[i].Messages.SelectMany(m => m.Contents).ToList();
                var reasoning = string.Concat(contents.OfType<TextReasoningContent>().Select(r => r.Text));
                var text = string.Concat(contents.OfType<TextContent>().Select(t => t.Text));
                var calls = contents.OfType<FunctionCallContent>().ToList();
                json.WriteStartObject();
                json.WriteNumber("index", i);
                json.WriteStartObject("message");
                json.WriteString("role", "assistant");
                if (text.Length == 0 && calls.Count > 0)
                {
                    json.WriteNull("content"); // as OpenAI: a message of tool calls only has no content
                }
                else
                {
                    json.WriteString("content", text);
                }

                if (calls.Count > 0)
                {
                    json.WriteStartArray("tool_calls");
                    foreach (var call in calls)
                    {
                        WriteToolCall(json, call, null);
                    }

                    json.WriteEndArray();
                }

                if (reasoning.Length > 0)
                {
                    json.WriteString("reasoning_content", reasoning);
                }
                else
                {
                    json.WriteNull("reasoning_content");
                }

                json.WriteEndObject();
                json.WriteNull("logprobs");
                json.WriteString("finish_reason", FinishReason(responses[i].FinishReason));
                json.WriteEndObject();
            }

            json.WriteEndArray();
            WriteUsage(json, responses.Select(r => r.Usage).ToArray());
            json.WriteEndObject();
        }

        await context.Response.BodyWriter.FlushAsync(context.RequestAborted);
    }

    private async Task StreamAsync(HttpContext context, ChatCompletionRequest request, string id, long created, CancellationTokenSource abort)
    {
        var streams = new IAsyncEnumerator<ChatResponseUpdate>[request.N];
        try
        {
            Task<bool>[] firsts;
            try
            {
                for (var i = 0; i < streams.Length; i++)
                {
                    // Options are checked here, synchronously, by the chat client.
                    streams[i] = client.GetStreamingResponseAsync(request.Messages, request.OptionsFor(i), abort.Token).GetAsyncEnumerator(abort.Token);
                }
            }
            catch (Exception e) when (FromEngine(e) is { } refused)
            {
                throw refused;
            }

            firsts = streams.Select(s => s.MoveNextAsync().AsTask()).ToArray();
            try
            {
                await Task.WhenAll(firsts);
            }
            catch (Exception) when (!context.RequestAborted.IsCancellationRequested)
            {
                var first = firsts.Where(t => t.IsFaulted).Select(t => t.Exception!.InnerException!).First();
                throw FromEngine(first) ?? first;
            }

            context.Response.ContentType = "text/event-stream";
            context.Response.Headers.CacheControl = "no-cache";
            var usages = new UsageDetails?[streams.Length];
            var callCounts = new int[streams.Length];
            using var gate = new SemaphoreSlim(1, 1); // one event at a time on the wire; choices interleave by event
            for (var i = 0; i < streams.Length; i++)
            {
                await WriteEventAsync(context, gate, json => WriteChunk(json, id, created, request, i, j =>
                {
                    j.WriteString("role", "assistant");
                    j.WriteString("content", "");
                }, null));
            }

            var failed = 0;
            var pumps = streams.Select(async (stream, index) =>
            {
                try
                {
                    var more = firsts[index].Result;
                    while (more)
                    {
                        await WriteUpdateAsync(context, gate, request, id, created, index, stream.Current, usages, callCounts);
                        more = await stream.MoveNextAsync();
                    }
                }
                catch (OperationCanceledException) when (abort.IsCancellationRequested)
                {
                    // The client went away, or a sibling choice failed and already said so.
                }
                catch (Exception e)
                {
                    // Output has gone out: the status line cannot change any more, so the stream ends with an error event.
                    if (Interlocked.Exchange(ref failed, 1) == 0)
                    {
                        ServerLog.StreamFailed(logger, e);
                        await abort.CancelAsync();
                        try
                        {
                            await WriteEventAsync(context, gate, json => OpenAIError.Write(json, $"generation failed: {e.Message}", "server_error", null, null));
                        }
                        catch (OperationCanceledException)
                        {
                        }
                    }
                }
            }).ToArray();
            await Task.WhenAll(pumps);
            if (failed != 0 || context.RequestAborted.IsCancellationRequested)
            {
                return;
            }

            if (request.IncludeUsage)
            {
                await WriteEventAsync(context, gate, json =>
                {
                    json.WriteStartObject();
                    WriteHeader(json, id, "chat.completion.chunk", created);
                    json.WriteStartArray("choices");
                    json.WriteEndArray();
                    WriteUsage(json, usages);
                    json.WriteEndObject();
                });
            }

            context.Response.BodyWriter.Write("data: [DONE]\n\n"u8);
            await context.Response.BodyWriter.FlushAsync(context.RequestAborted);
        }
        finally
        {
            // Ends every request still running (a failure or a disconnect): its blocks return to the pool.
            await abort.CancelAsync();
            foreach (var s in streams)
            {
                if (s is not null)
                {
                    try
                    {
                        await s.DisposeAsync();
                    }
                    catch (OperationCanceledException)
                    {
                    }
                }
            }
        }
    }

    private async Task WriteUpdateAsync(HttpContext context, SemaphoreSlim gate, ChatCompletionRequest request, string id, long created, int index, ChatResponseUpdate update, UsageDetails?[] usages, int[] callCounts)
    {
        foreach (var content in update.Contents)
        {
            switch (content)
            {
                case FunctionCallContent call:
                    // Each call goes out whole, in one delta, once the model has finished writing it.
                    var callIndex = callCounts[index]++;
                    await WriteEventAsync(context, gate, json => WriteChunk(json, id, created, request, index, j =>
                    {
                        j.WriteStartArray("tool_calls");
                        WriteToolCall(j, call, callIndex);
                        j.WriteEndArray();
                    }, null));
                    break;
                case TextReasoningContent r when r.Text.Length > 0:
                    await WriteEventAsync(context, gate, json => WriteChunk(json, id, created, request, index, j => j.WriteString("reasoning_content", r.Text), null));
                    break;
                case TextContent t when t.Text.Length > 0:
                    await WriteEventAsync(context, gate, json => WriteChunk(json, id, created, request, index, j => j.WriteString("content", t.Text), null));
                    break;
                case UsageContent u:
                    usages[index] = u.Details;
                    break;
            }
        }

        if (update.FinishReason is { } finish)
        {
            await WriteEventAsync(context, gate, json => WriteChunk(json, id, created, request, index, _ => { }, FinishReason(finish)));
        }
    }

    private static async Task WriteEventAsync(HttpContext context, SemaphoreSlim gate, Action<Utf8JsonWriter> write)
    {
        await gate.WaitAsync(context.RequestAborted);
        try
        {
            var pipe = context.Response.BodyWriter;
            pipe.Write("data: "u8);
            using (var json = new Utf8JsonWriter(pipe))
            {
                write(json);
            }

            pipe.Write("\n\n"u8);
            await pipe.FlushAsync(context.RequestAborted);
        }
        finally
        {
            gate.Release();
        }
    }

    private void WriteChunk(Utf8JsonWriter json, string id, long created, ChatCompletionRequest request, int index, Action<Utf8JsonWriter> delta, string? finish)
    {
        json.WriteStartObject();
        WriteHeader(json, id, "chat.completion.chunk", created);
        json.WriteStartArray("choices");
        json.WriteStartObject();
        json.WriteNumber("index", index);
        json.WriteStartObject("delta");
        delta(json);
        json.WriteEndObject();
        json.WriteNull("logprobs");
        if (finish is null)
        {
            json.WriteNull("finish_reason");
        }
        else
        {
            json.WriteString("finish_reason", finish);
        }

        json.WriteEndObject();
        json.WriteEndArray();
        if (request.IncludeUsage)
        {
            // As OpenAI: with include_usage every chunk carries "usage": null but the last, which carries the totals.
            json.WriteNull("usage");
        }

        json.WriteEndObject();
    }

    private void WriteHeader(Utf8JsonWriter json, string id, string kind, long created)
    {
        json.WriteString("id", id);
        json.WriteString("object", kind);
        json.WriteNumber("created", created);
        json.WriteString("model", modelId);
        json.WriteString("system_fingerprint", Fingerprint);
    }

    /// <summary>Prompt tokens once (every choice reads the same prompt), completion tokens summed over the choices.</summary>
    private static void WriteUsage(Utf8JsonWriter json, UsageDetails?[] usages)
    {
        var prompt = usages.FirstOrDefault()?.InputTokenCount ?? 0;
        var completion = usages.Sum(u => u?.OutputTokenCount ?? 0);
        json.WriteStartObject("usage");
        json.WriteNumber("prompt_tokens", prompt);
        json.WriteNumber("completion_tokens", completion);
        json.WriteNumber("total_tokens", prompt + completion);
        json.WriteEndObject();
    }

    private static string FinishReason(ChatFinishReason? reason) =>
        reason == ChatFinishReason.Length ? "length"
        : reason == ChatFinishReason.ContentFilter ? "content_filter"
        : reason == ChatFinishReason.ToolCalls ? "tool_calls"
        : "stop";

    /// <summary>
    /// One tool call as OpenAI writes it; <paramref name="index"/> is set in a streamed delta. The arguments are the
    /// model's own text where the chat client kept it (<see cref="AIContent.RawRepresentation"/>), so a call whose
    /// arguments do not parse still reaches the client as written.
    /// </summary>
    private static void WriteToolCall(Utf8JsonWriter json, FunctionCallContent call, int? index)
    {
        json.WriteStartObject();
        if (index is { } i)
        {
            json.WriteNumber("index", i);
        }

        json.WriteString("id", call.CallId);
        json.WriteString("type", "function");
        json.WriteStartObject("function");
        json.WriteString("name", call.Name);
        json.WriteString("arguments", call.RawRepresentation as string ?? JsonSerializer.Serialize(call.Arguments ?? new Dictionary<string, object?>(), AIJsonUtilities.DefaultOptions));
        json.WriteEndObject();
        json.WriteEndObject();
    }
}

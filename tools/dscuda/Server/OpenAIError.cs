using System.Text.Json;
using Microsoft.AspNetCore.Http;

namespace DeepSeekCuda.Cli.Server;

/// <summary>
/// A request the server answers with OpenAI's error object
/// (<c>{"error":{"message","type","param","code"}}</c>) and an HTTP status.
/// </summary>
internal sealed class OpenAIErrorException(int status, string message, string? param, string? code = null, string type = "invalid_request_error")
    : Exception(message)
{
    public int Status { get; } = status;

    public string? Param { get; } = param;

    public string? Code { get; } = code;

    public string Type { get; } = type;

    /// <summary>400 naming the field: the usual answer to a bad request.</summary>
    public static OpenAIErrorException Invalid(string? param, string message, string? code = null) => new(StatusCodes.Status400BadRequest, message, param, code);

    /// <summary>400 for a request field the engine would have to ignore.</summary>
    public static OpenAIErrorException Unsupported(string param, string why) =>
        new(StatusCodes.Status400BadRequest, $"'{param}' is not supported by this server: {why}", param, "unsupported_parameter");
}

/// <summary>Writes OpenAI's error object.</summary>
internal static class OpenAIError
{
    public static void Write(Utf8JsonWriter json, string message, string type, string? param, string? code)
    {
        json.WriteStartObject();
        json.WriteStartObject("error");
        json.WriteString("message", message);
        json.WriteString("type", type);
        WriteNullable(json, "param", param);
        WriteNullable(json, "code", code);
        json.WriteEndObject();
        json.WriteEndObject();
    }

    public static Task RespondAsync(HttpContext context, OpenAIErrorException e) =>
        RespondAsync(context, e.Status, e.Message, e.Type, e.Param, e.Code);

    public static async Task RespondAsync(HttpContext context, int status, string message, string type, string? param, string? code)
    {
        context.Response.StatusCode = status;
        context.Response.ContentType = "application/json";
        await using (var json = new Utf8JsonWriter(context.Response.BodyWriter))
        {
            Write(json, message, type, param, code);
        }

        await context.Response.BodyWriter.FlushAsync(context.RequestAborted);
    }

    private static void WriteNullable(Utf8JsonWriter json, string name, string? value)
    {
        if (value is null)
        {
            json.WriteNull(name);
        }
        else
        {
            json.WriteString(name, value);
        }
    }
}

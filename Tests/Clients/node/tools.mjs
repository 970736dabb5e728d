// The openai npm package with tools and response_format against `dscuda serve`:
//   node tools.mjs SCRIPTED_BASE_URL FREE_BASE_URL MODEL
// SCRIPTED serves a model made to write a get_weather call (and, given the tool's output, an answer quoting it);
// FREE serves the demo's own output. Prints one JSON object; Tests/Serve/NodeClientTests.cs asserts on it.
import OpenAI from "openai";

const [scriptedURL, freeURL, model] = process.argv.slice(2);
const options = { apiKey: "none", maxRetries: 0, timeout: 60_000 };
const scripted = new OpenAI({ baseURL: scriptedURL, ...options });
const free = new OpenAI({ baseURL: freeURL, ...options });
const tools = [{
  type: "function",
  function: {
    name: "get_weather",
    description: "The forecast for a city",
    parameters: { type: "object", properties: { city: { type: "string" }, days: { type: "integer" } }, required: ["city", "days"] },
  },
}];
const messages = [{ role: "user", content: "What is the weather in Paris?" }];
const out = {};

const whole = await scripted.chat.completions.create({ model, messages, tools, temperature: 0, max_tokens: 200 });
const message = whole.choices[0].message;
out.whole = { finish: whole.choices[0].finish_reason, content: message.content, toolCalls: message.tool_calls ?? null };

const stream = await scripted.chat.completions.create({ model, messages, tools, temperature: 0, max_tokens: 200, stream: true });
const calls = [];
let finish = null;
for await (const chunk of stream) {
  for (const choice of chunk.choices) {
    for (const delta of choice.delta.tool_calls ?? []) {
      const call = (calls[delta.index] ??= { id: "", name: "", arguments: "" });
      call.id += delta.id ?? "";
      call.name += delta.function?.name ?? "";
      call.arguments += delta.function?.arguments ?? "";
    }
    finish = choice.finish_reason ?? finish;
  }
}
out.streamed = { finish, calls };

messages.push(message);
messages.push({ role: "tool", tool_call_id: message.tool_calls[0].id, content: "sunny for 2 days in Paris" });
const answer = await scripted.chat.completions.create({ model, messages, tools, temperature: 0, max_tokens: 200 });
out.answer = { finish: answer.choices[0].finish_reason, content: answer.choices[0].message.content };

const schema = {
  type: "object",
  properties: { unit: { type: "string", enum: ["celsius", "fahrenheit"] }, windy: { type: "boolean" } },
  required: ["unit", "windy"],
  additionalProperties: false,
};
const json = await free.chat.completions.create({
  model,
  messages: [{ role: "user", content: "Forecast?" }],
  response_format: { type: "json_schema", json_schema: { name: "forecast", strict: true, schema } },
  temperature: 1,
  seed: 7,
  max_tokens: 600,
});
out.json = { finish: json.choices[0].finish_reason, content: json.choices[0].message.content };

console.log(JSON.stringify(out));

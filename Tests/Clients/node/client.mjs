// The openai npm package as a real client of `dscuda serve`: node client.mjs BASE_URL MODEL [API_KEY]
// Prints one JSON object with what it saw; Tests/Serve/NodeClientTests.cs asserts on it.
import OpenAI from "openai";

const [baseURL, model, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: apiKey ?? "none", maxRetries: 0, timeout: 60_000 });
const messages = [{ role: "user", content: "Why is the sky blue?" }];
const out = {};

const whole = await client.chat.completions.create({ model, messages, temperature: 0, max_tokens: 8 });
out.whole = {
  object: whole.object,
  content: whole.choices[0].message.content,
  reasoning: whole.choices[0].message.reasoning_content ?? null,
  finish: whole.choices[0].finish_reason,
  usage: whole.usage,
};

const stream = await client.chat.completions.create({
  model, messages, temperature: 0, max_tokens: 8, stream: true, stream_options: { include_usage: true },
});
let content = "", reasoning = "", finish = null, usage = null, chunks = 0;
for await (const chunk of stream) {
  chunks++;
  for (const choice of chunk.choices) {
    content += choice.delta.content ?? "";
    reasoning += choice.delta.reasoning_content ?? "";
    finish = choice.finish_reason ?? finish;
  }
  usage = chunk.usage ?? usage;
}
out.streamed = { content, reasoning, finish, usage, chunks };

try {
  await client.chat.completions.create({ model, messages, max_tokens: 0 });
  out.bad = { error: "no error" };
} catch (e) {
  out.bad = { isApiError: e instanceof OpenAI.APIError, status: e.status ?? null, param: e.param ?? null, message: e.message };
}

console.log(JSON.stringify(out));

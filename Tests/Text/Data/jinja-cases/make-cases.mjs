// Generator of tool-template-cases.json (README.md): renders conversations with tool definitions through
// the templates in this folder, evaluated by @huggingface/jinja (pinned in package-lock.json).
//   npm ci && node make-cases.mjs > tool-template-cases.json
import fs from 'fs';
import { Template } from '@huggingface/jinja';

const BOS = '<｜begin▁of▁sentence｜>';
const load = f => new Template(fs.readFileSync(new URL(f, import.meta.url), 'utf8'));
const official = { V3: load('./deepseek-v3-chat_template.jinja') };
const convention = { V3: load('./sglang-tool_chat_template_deepseekv3.jinja'), R1: load('./sglang-tool_chat_template_deepseekr1.jinja') };

// A tool as ChatToolDefinition holds it, and as the OpenAI API sends it (absent members left out).
const openAiTool = t => {
  const f = { name: t.name };
  if (t.description !== undefined) f.description = t.description;
  if (t.parameters !== undefined) f.parameters = t.parameters;
  return { type: 'function', function: f };
};

const weather = {
  name: 'get_weather',
  description: 'Get the current weather in a given location',
  parameters: { type: 'object', properties: { location: { type: 'string', description: 'City and state, e.g. San Francisco, CA' }, unit: { type: 'string', enum: ['celsius', 'fahrenheit'] } }, required: ['location'] },
};
const noDescription = { name: 'search', parameters: { type: 'object', properties: { query: { type: 'string' } }, required: ['query'] } };
const noParameters = { name: 'get_time', description: 'Current UTC time.' };
const bare = { name: 'ping' };
const nested = {
  name: 'create_event',
  description: 'Creates an event.\nQuotes " and backslashes \\ and a tab\t, \r, \b, \f and a control \u0001 \u001f stay escaped; / \u007f \u2028 \u00a0 do not.',
  parameters: {
    type: 'object',
    properties: {
      title: { type: 'string', minLength: 1, maxLength: 200 },
      attendees: { type: 'array', items: { type: 'object', properties: { email: { type: 'string', format: 'email' }, optional: { type: 'boolean', default: false } }, required: ['email'] } },
      priority: { type: 'number', minimum: -1.5, maximum: 10, multipleOf: 0.5 },
      location: { anyOf: [{ type: 'string' }, { type: 'null' }], default: null },
      metadata: { type: 'object', properties: {}, additionalProperties: true },
      tags: { type: 'array', items: [], uniqueItems: true },
    },
    required: ['title', 'attendees'],
  },
};
// Members in an unusual order stay in it (tojson does not sort keys).
const ordered = { name: 'ordered', description: '', parameters: { required: ['z'], properties: { z: { type: 'integer' }, a: { type: 'string' } }, type: 'object' } };
const unicode = {
  name: 'translate_文本',
  description: 'Traduit le texte — 翻译文本 😀 (ünïcödé, 한국어, עברית)',
  parameters: { type: 'object', properties: { 'texte_à_traduire': { type: 'string', description: '原文 🇫🇷' }, 'langue': { type: 'string', enum: ['français', '中文', 'русский'] } } },
};
const toolSets = {
  weather: [weather], noDescription: [noDescription], noParameters: [noParameters], bare: [bare],
  nested: [nested], unicode: [unicode], several: [weather, noDescription, noParameters, bare, nested, unicode], ordered: [ordered, bare],
};

const call = (name, args, type = 'function') => ({ type, function: { name, arguments: args } });
const u = content => ({ role: 'user', content });
const s = content => ({ role: 'system', content });
const a = content => ({ role: 'assistant', content });
const calls = (list, content = null) => ({ role: 'assistant', content, tool_calls: list });
const tool = content => ({ role: 'tool', content });

const conversations = {
  user: [u('What is the weather in Paris?')],
  system_user: [s('You are a helpful assistant.'), u('What is the weather in Paris?')],
  two_systems: [s('Be brief.'), s('Answer in English.'), u('Hi')],
  system_only: [s('Only a system prompt.')],
  one_call_result_answer: [u('Weather in Paris?'), calls([call('get_weather', '{"location": "Paris"}')]), tool('{"temperature": 21}'), a('It is 21 °C in Paris.'), u('And in Rome?')],
  several_calls_results: [s('Use tools.'), u('Weather in Paris and Rome?'),
    calls([call('get_weather', '{"location": "Paris"}'), call('get_weather', '{"location":"Rome","unit":"celsius"}')]),
    tool('{"temperature": 21}'), tool('{"temperature": 25}'), a('Paris 21 °C, Rome 25 °C.'), u('Thanks!')],
  calls_with_text: [u('Search for cats.'), calls([call('search', '{"query": "cats"}')], 'Let me search.'), tool('3 results'), a('Found 3.')],
  results_then_user: [u('Time?'), calls([call('get_time', '{}')]), tool('12:00'), u('Now ping.')],
  ends_on_result: [u('Ping twice.'), calls([call('ping', ''), call('ping', '{}')]), tool('pong'), tool('pong')],
  two_rounds: [u('Weather in Paris then Rome.'), calls([call('get_weather', '{"location": "Paris"}')]), tool('sunny'),
    calls([call('get_weather', '{"location": "Rome"}'), call('get_time', '{}')]), tool('rainy'), tool('09:30'), a('Paris sunny, Rome rainy.')],
  unicode_turns: [s('Réponds en français 🇫🇷.'), u('Quel temps à 北京 ?'), calls([call('translate_文本', '{"texte_à_traduire": "晴天 ☀️", "langue": "français"}')]), tool('Ensoleillé ☀️'), a('Il fait beau à 北京.')],
  custom_type: [u('Run it.'), calls([call('run', '{"cmd": "ls"}', 'code_interpreter')]), tool('a.txt'), u('ok')],
};

const plan = [
  ['user', 'weather'], ['user', 'noDescription'], ['user', 'noParameters'], ['user', 'bare'], ['user', 'nested'], ['user', 'unicode'], ['user', 'several'],
  ['system_user', 'weather'], ['user', 'ordered'], ['system_user', 'several'], ['two_systems', 'bare'], ['system_only', 'noParameters'],
  ['one_call_result_answer', 'weather'], ['several_calls_results', 'several'], ['calls_with_text', 'noDescription'], ['results_then_user', 'noParameters'],
  ['ends_on_result', 'bare'], ['two_rounds', 'several'], ['unicode_turns', 'unicode'], ['custom_type', 'nested'],
];

const render = (template, messages, tools, addGenerationPrompt) => template.render({
  messages, bos_token: BOS, add_generation_prompt: addGenerationPrompt, ...(tools ? { tools: tools.map(openAiTool) } : {}),
});
const check = (cond, what) => { if (!cond) throw new Error(what); };

const cases = [];
for (const [conversation, toolSet] of plan) {
  const messages = conversations[conversation];
  const tools = toolSets[toolSet];
  const systems = messages.filter(m => m.role === 'system');
  // The convention's prompt head: BOS, the system prompt, then the tool block; the block is the difference
  // between rendering the system messages alone with and without tools (R1's copy has no stray whitespace).
  const head = render(convention.R1, systems, null, false);
  const headWithTools = render(convention.R1, systems, tools, false);
  check(head === BOS + systems.map(m => m.content).join('\n\n'), `head of ${conversation}`);
  check(headWithTools.startsWith(head), `tool head of ${conversation}`);
  const toolBlock = headWithTools.slice(head.length);
  // The V3 copy writes the same block, after a stray newline before BOS.
  check(render(convention.V3, systems, tools, false).includes(head + toolBlock), `V3 copy of ${conversation}`);
  for (const kind of ['V3', 'R1']) {
    for (const addGenerationPrompt of [true, false]) {
      const c = { name: `${kind}/${conversation}/${toolSet}/${addGenerationPrompt ? 'gen' : 'nogen'}`, kind, add_generation_prompt: addGenerationPrompt, tools, messages, head, tool_block: toolBlock };
      if (kind === 'V3') {
        // V3's own template renders the conversation; the convention puts the tool block after its system prompt.
        const text = render(official.V3, messages, null, addGenerationPrompt);
        check(text.startsWith(head), `official head of ${c.name}`);
        c.official_text = text;
        c.text = head + toolBlock + text.slice(head.length);
      }
      cases.push(c);
    }
  }
}

const out = {
  produced_by: '@huggingface/jinja 0.5.13 (make-cases.mjs): tool block from sglang tool_chat_template_deepseekr1.jinja (same text in its deepseekv3 copy); V3 conversation text from deepseek-v3 tokenizer_config.json chat_template',
  cases,
};
// Non-ASCII as \u escapes, as the other case files do, so the file survives any editor.
process.stdout.write(JSON.stringify(out, null, 1).replace(/[\u007f-\uffff]/g, ch => '\\u' + ch.charCodeAt(0).toString(16).padStart(4, '0')) + '\n');

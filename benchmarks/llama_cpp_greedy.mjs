// Greedy continuation of given token ids by llama.cpp (through node-llama-cpp's prebuilt CPU build), for
// benchmarks/bench_gguf.py:  node llama_cpp_greedy.mjs MODEL.gguf '[1,2,3]' N [flash-attention: 0|1] ['["text", ...]']
//     [LORA-ADAPTER.gguf]
// Prints one JSON line: {"tokens": [...], "kv": [llama.cpp's log lines about its KV cache], "seconds": time to
// evaluate the prompt and generate the N tokens (model, context and adapter loaded before),
// "tokenized": [llama.cpp's token ids of each text given: special-token text parsed, none added]}.
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const [modelPath, idsJson, n, flash = "0", textsJson = "[]", lora = ""] = process.argv.slice(2);
const kv = [];
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.debug,
    logger: (_level, message) => { if (message.startsWith("llama_kv_cache: size")) kv.push(message.trim()); }});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: 512, flashAttention: flash === "1",
    ...(lora ? {lora: {adapters: [{filePath: lora, scale: 1}]}} : {})});
const sequence = context.getSequence();
const out = [];
const started = performance.now();
for await (const token of sequence.evaluate(JSON.parse(idsJson), {temperature: 0})) {
    out.push(token);
    if (out.length >= Number(n)) break;
}
const seconds = (performance.now() - started) / 1000;  // the prompt and the continuation, model loaded
const tokenized = JSON.parse(textsJson).map((text) => Array.from(model.tokenize(text, true)));  // special tokens parsed, as transformers does
console.log(JSON.stringify({tokens: out, kv, tokenized, seconds}));
await context.dispose();
await model.dispose();

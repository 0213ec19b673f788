// Greedy continuation of given token ids by llama.cpp (through node-llama-cpp's prebuilt CPU build), for
// benchmarks/bench_gguf.py:  node llama_cpp_greedy.mjs MODEL.gguf '[1,2,3]' N [flash-attention: 0|1] ['["text", ...]']
// Prints one JSON line: {"tokens": [...], "kv": [llama.cpp's log lines about its KV cache],
// "tokenized": [llama.cpp's token ids of each text given: special-token text parsed, none added]}.
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const [modelPath, idsJson, n, flash = "0", textsJson = "[]"] = process.argv.slice(2);
const kv = [];
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.debug,
    logger: (_level, message) => { if (message.startsWith("llama_kv_cache: size")) kv.push(message.trim()); }});
const model = await llama.loadModel({modelPath});
const context = await model.createContext({contextSize: 512, flashAttention: flash === "1"});
const sequence = context.getSequence();
const out = [];
for await (const token of sequence.evaluate(JSON.parse(idsJson), {temperature: 0})) {
    out.push(token);
    if (out.length >= Number(n)) break;
}
const tokenized = JSON.parse(textsJson).map((text) => Array.from(model.tokenize(text, true)));  // special tokens parsed, as transformers does
console.log(JSON.stringify({tokens: out, kv, tokenized}));
await context.dispose();
await model.dispose();

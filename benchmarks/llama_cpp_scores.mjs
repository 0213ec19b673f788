// llama.cpp's next-token distributions along given token windows (teacher-forced: each window evaluated as given),
// for benchmarks/bench_gguf.py:  node llama_cpp_scores.mjs MODEL.gguf '[[1,2,3,...], ...]' START K [LORA-ADAPTER.gguf]
// Prints one JSON line: {"windows": [[[[token, probability], ...K of the most likely], ...one per position from
// START - 1 to the window's second-to-last token], ...]}: the distribution after each of those positions, i.e. over
// tokens START..end, unsampled (temperature 1, no top-k, top-p or min-p cut).
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const [modelPath, windowsJson, start, k, lora = ""] = process.argv.slice(2);
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath});
const windows = JSON.parse(windowsJson);
const context = await model.createContext({contextSize: Math.max(...windows.map((w) => w.length)) + 8,
    ...(lora ? {lora: {adapters: [{filePath: lora, scale: 1}]}} : {})});
const sequence = context.getSequence();
const raw = {probabilities: true, options: {temperature: 1, topK: 0, topP: 1, minP: 0}};
const out = [];
for (const window of windows) {
    await sequence.clearHistory();
    const input = window.slice(0, -1).map((token, i) => (i >= Number(start) - 1 ? [token, {generateNext: raw}] : token));
    const results = await sequence.controlledEvaluate(input);
    const positions = [];
    for (let i = Number(start) - 1; i < input.length; i++)
        positions.push(Array.from(results[i].next.probabilities.entries()).slice(0, Number(k)));
    out.push(positions);
}
console.log(JSON.stringify({windows: out}));
await context.dispose();
await model.dispose();

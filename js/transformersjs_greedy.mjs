// transformers.js answers like edgekd: load an edgekd web bundle (`edgekd export MODEL --target web`)
// with @huggingface/transformers' AutoModelForCausalLM.from_pretrained, as an app would, and print
// the greedy tokens it generates after each prompt, as JSON: [[id, ...], ...].
//
//   node js/transformersjs_greedy.mjs BUNDLE '[[1, 85, ...], ...]' N [node|web]
//
// The prompts come as token ids (the bundle's golden.json has them), so the comparison is of the
// models alone. "node": onnxruntime-node (transformers.js's default in Node); "web": onnxruntime-web's
// WebAssembly build, single-threaded, what a page without cross-origin isolation runs. Packages are
// found beside this file or where NODE_PATH says (`make js-deps` installs them into .cache/js).
import path from "node:path";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const load = async (pkg) => {
  try {
    return await import(pkg);
  } catch {
    return require(pkg);  // CommonJS resolution honours NODE_PATH
  }
};

const [dir, idsJson, n, backend = "node"] = process.argv.slice(2);
if (!dir || !idsJson || !(Number(n) > 0) || !["node", "web"].includes(backend)) {
  console.error("usage: node transformersjs_greedy.mjs BUNDLE IDS_JSON MAX_NEW_TOKENS [node|web]");
  process.exit(2);
}
let ortWeb = null;
if (backend === "web") {  // transformers.js takes the runtime a host exposes under this symbol
  ortWeb = await load("onnxruntime-web");
  ortWeb = ortWeb.default || ortWeb;
  ortWeb.env.wasm.numThreads = 1;
  ortWeb.env.wasm.wasmPaths = path.dirname(require.resolve("onnxruntime-web")) + "/";  // not transformers.js's CDN
  globalThis[Symbol.for("onnxruntime")] = ortWeb;
}
const tjs = await load("@huggingface/transformers");
tjs.env.allowRemoteModels = false;  // nothing from the hub: the folder only
const root = path.resolve(dir);
tjs.env.localModelPath = path.dirname(root) + "/";
const model = await tjs.AutoModelForCausalLM.from_pretrained(path.basename(root), {
  local_files_only: true,
  ...(backend === "web" ? { device: "auto", session_options: { executionProviders: ["wasm"] } } : {}),
});
const out = [];
for (const ids of JSON.parse(idsJson)) {
  const input_ids = new tjs.Tensor("int64", BigInt64Array.from(ids.map(BigInt)), [1, ids.length]);
  const attention_mask = new tjs.Tensor("int64", BigInt64Array.from(ids.map(() => 1n)), [1, ids.length]);
  const seq = await model.generate({ input_ids, attention_mask, max_new_tokens: Number(n), do_sample: false });
  out.push(Array.from(seq.tolist()[0].slice(ids.length), Number));
}
console.log(JSON.stringify(out));

// edgekd's golden replay in JavaScript: is this bundle still the model it was exported from?
//
//     npm install --ignore-scripts onnxruntime-node      # once, beside your app
//     node check.mjs [BUNDLE_DIR] [--threads N] [--num-prompts N] [--json FILE] [--ort node|web]
//
// `--ort web` runs onnxruntime-web's WebAssembly build (the CPU kernels a browser runs) in Node.
//
// The bundle's golden.json holds the reference's greedy answers to held-out prompts as token ids,
// and its top-k log-probabilities at every answer position. This module replays them through
// onnxruntime (onnxruntime-node here; `replay` takes any onnxruntime-common `ort`, e.g.
// onnxruntime-web in a page) from those token ids: no tokenizer is needed. It prints the figures
// `edgekd check` prints (top-1 agreement, KL on the top-k with a bucket for the rest, perplexity
// ratio, greedy answers identical, common prefix) and applies the gates of the bundle's target
// profile that a golden can answer. First, as `edgekd check` does, it checks every file the
// manifest lists (size and SHA-256; no path may leave the bundle): a changed file is bad input.
// Exit code: 0 every gate passes, 1 a gate fails, 2 bad input.
// It needs nothing but onnxruntime: copy it anywhere the bundle goes.

const GOLDEN_GATES = {
  min_top1_vs_reference: ["top1", "min", "top-1 agreement with the reference"],
  max_kl_vs_reference: ["kl_mean", "max", "mean KL(reference || bundle), nats"],
  max_ppl_ratio_vs_reference: ["ppl_ratio", "max", "perplexity ratio bundle / reference"],
  min_greedy_exact_vs_reference: ["greedy_exact", "min", "share of prompts whose greedy answer is the reference's, token for token"],
  min_greedy_prefix_vs_reference: ["greedy_prefix_tokens", "min", "mean common prefix (tokens) of greedy answers with the reference"],
  max_size_mb: ["size_mb", "max", "model file(s) size, MB (1e6 bytes)"],
  min_decode_tokens_per_s: ["decode_tokens_per_s", "min", "decode tokens/s at batch 1 on this machine"],
};
const KV_NAME = /^past_key_values\.(\d+)\.(key|value)$/;

function logSoftmax(logits, offset, vocab) {
  let max = -Infinity;
  for (let i = 0; i < vocab; i++) max = Math.max(max, logits[offset + i]);
  let sum = 0;
  for (let i = 0; i < vocab; i++) sum += Math.exp(logits[offset + i] - max);
  const lse = max + Math.log(sum);
  const out = new Float64Array(vocab);
  for (let i = 0; i < vocab; i++) out[i] = logits[offset + i] - lse;
  return out;
}

function argmax(logits, offset, vocab) {
  let best = 0;
  for (let i = 1; i < vocab; i++) if (logits[offset + i] > logits[offset + best]) best = i;
  return best;
}

// KL over the reference's top-k (probabilities p, the bundle's log-probs lq of the same tokens) and
// one bucket for the rest: as edgekd.device.check._rest_kl.
function restKL(p, lq) {
  let sp = 0, sq = 0, kl = 0;
  for (let i = 0; i < p.length; i++) {
    sp += p[i];
    sq += Math.exp(lq[i]);
    kl += p[i] * (Math.log(Math.max(p[i], 1e-300)) - lq[i]);
  }
  const restP = Math.max(1 - sp, 0), restQ = Math.max(1 - sq, 1e-12);
  if (restP > 0) kl += restP * (Math.log(restP) - Math.log(restQ));
  return Math.max(kl, 0);
}

function percentile(values, q) {  // numpy's default (linear interpolation)
  const v = [...values].sort((a, b) => a - b);
  const pos = (v.length - 1) * q / 100, lo = Math.floor(pos), hi = Math.ceil(pos);
  return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}

const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;

// A decoder session with its KV cache, fed as edgekd.device.runtime.Runtime feeds it.
class Decoder {
  constructor(ort, session, manifest) {
    this.ort = ort;
    this.session = session;
    const model = manifest.model || {};
    this.past = session.inputNames.filter((n) => KV_NAME.test(n)).sort((a, b) => {
      const [, la, ka] = a.match(KV_NAME), [, lb, kb] = b.match(KV_NAME);
      return (+la - +lb) || (ka === "key" ? -1 : 1) - (kb === "key" ? -1 : 1);
    });
    if (!session.inputNames.includes("input_ids") || !this.past.length) throw new UsageError("the model is not a KV-cache decoder (no input_ids or past_key_values inputs)");
    const kvInput = (model.inputs || []).find((i) => i.name === this.past[0]);
    if (kvInput && kvInput.dtype !== "float32") throw new UsageError(`cache type ${kvInput.dtype}: this replay reads float32 caches only`);
    this.heads = model.num_kv_heads;
    this.headDim = model.head_dim;
    this.positions = session.inputNames.includes("position_ids");
  }

  reset() {
    this.len = 0;
    this.cache = Object.fromEntries(this.past.map((n) => [n, new this.ort.Tensor("float32", new Float32Array(0), [1, this.heads, 0, this.headDim])]));
  }

  // Run `ids` after the cached positions; return the logits (Float32Array, rows x vocab): a row per id,
  // or the last id's alone where the graph has edgekd's logits_to_keep input (left at its default).
  async run(ids) {
    const { Tensor } = this.ort, s = ids.length, total = this.len + s;
    const feeds = {
      input_ids: new Tensor("int64", BigInt64Array.from(ids, BigInt), [1, s]),
      attention_mask: new Tensor("int64", new BigInt64Array(total).fill(1n), [1, total]),
      ...this.cache,
    };
    if (this.positions) feeds.position_ids = new Tensor("int64", BigInt64Array.from({ length: s }, (_, i) => BigInt(this.len + i)), [1, s]);
    const out = await this.session.run(feeds);
    for (const n of this.past) this.cache[n] = out[n.replace(/^past_key_values\./, "present.")];
    this.len = total;
    this.vocab = out.logits.dims[2];
    this.rows = out.logits.dims[1];
    return out.logits.data;
  }
}

class UsageError extends Error {}

// The model file and its external data, MB: as edgekd.device.bundle.Manifest.model_bytes.
function modelMB(manifest) {
  const name = manifest.model.file || "model.onnx";
  return (manifest.files || []).filter((f) => f.path === name || f.path.startsWith(`${name}.`)).reduce((s, f) => s + f.bytes, 0) / 1e6;
}

// The figures of `edgekd check` for `examples` (golden.json's), and the greedy answers.
export async function replay(ort, session, manifest, golden, { numPrompts = 0, log = () => {} } = {}) {
  const dec = new Decoder(ort, session, manifest);
  const examples = numPrompts ? golden.examples.slice(0, numPrompts) : golden.examples;
  const n = golden.answer_tokens || Math.max(...examples.map((e) => e.answer_ids.length));
  const eos = new Set(manifest.model.eos_token_ids || []);
  const agree = [], kls = [], nllB = [], nllR = [];
  log(`${examples.length} golden prompts: the reference's answers teacher-forced, then the bundle's own ...`);
  for (const ex of examples) {  // teacher-forced: the prompt, then the answer a token at a time (as an app decodes)
    dec.reset();
    let logits = await dec.run(ex.prompt_ids), row = dec.rows - 1;
    for (let pos = 0; pos < ex.answer_ids.length; pos++) {
      if (pos > 0) { logits = await dec.run([ex.answer_ids[pos - 1]]); row = 0; }
      const lb = logSoftmax(logits, row * dec.vocab, dec.vocab);
      const ids = ex.topk_ids[pos], lp = ex.topk_logprobs[pos];
      agree.push(argmax(lb, 0, dec.vocab) === ids[0] ? 1 : 0);
      kls.push(restKL(lp.map(Math.exp), ids.map((t) => lb[t])));
      const token = ex.answer_ids[pos];
      nllB.push(-lb[token]);
      const k = ids.indexOf(token);
      nllR.push(-(k >= 0 ? lp[k] : lp[lp.length - 1]));
    }
  }
  const answers = [];
  let decodeSeconds = 0, decodeSteps = 0;
  for (const ex of examples) {  // greedy, as edgekd.device.fidelity.bundle_greedy: an eos ends and is kept
    dec.reset();
    let logits = await dec.run(ex.prompt_ids), offset = (dec.rows - 1) * dec.vocab;
    const answer = [];
    for (let i = 0; i < n; i++) {
      const token = argmax(logits, offset, dec.vocab);
      answer.push(token);
      if (eos.has(token) || i + 1 === n) break;
      const t = performance.now();
      logits = await dec.run([token]);
      decodeSeconds += (performance.now() - t) / 1000;
      decodeSteps += 1;
      offset = 0;
    }
    answers.push(answer);
  }
  const exact = answers.map((a, i) => a.length === examples[i].answer_ids.length && a.every((t, j) => t === examples[i].answer_ids[j]));
  const prefix = answers.map((a, i) => {
    if (exact[i]) return n;
    let k = 0;
    while (k < a.length && k < examples[i].answer_ids.length && a[k] === examples[i].answer_ids[k]) k++;
    return k;
  });
  const pplB = Math.exp(mean(nllB)), pplR = Math.exp(mean(nllR));
  return {
    figures: {
      prompts: examples.length, positions: agree.length, top1: mean(agree), kl_mean: mean(kls), kl_p95: percentile(kls, 95),
      ppl_bundle: pplB, ppl_model: pplR, ppl_ratio: pplB / pplR, greedy_exact: mean(exact.map(Number)), greedy_prefix_tokens: mean(prefix),
      decode_tokens_per_s: decodeSteps / Math.max(decodeSeconds, 1e-9), answer_tokens: n, size_mb: modelMB(manifest),
    },
    answers,
  };
}

// The target profile's gates a golden answers: [{name, value, threshold, passed, line}].
export function applyGates(gates, figures) {
  const out = [];
  for (const [name, threshold] of Object.entries(gates || {})) {
    if (threshold === null || threshold === undefined || !(name in GOLDEN_GATES)) continue;
    const [key, direction, meaning] = GOLDEN_GATES[name];
    const value = figures[key];
    if (value === undefined) continue;
    const passed = direction === "min" ? value >= threshold : value <= threshold;
    out.push({ name, value, threshold, passed, line: `${name}: ${+value.toPrecision(4)} (needs ${direction === "min" ? ">=" : "<="} ${threshold}; ${meaning})` });
  }
  return out;
}

// A relative path that stays inside the bundle ("onnx/model_q4.onnx"; never "/x", "..", "a\\b" or "a//b").
export function isInside(p) {
  return typeof p === "string" && p !== "" && !p.startsWith("/") && !p.includes("\\") && !p.split("/").some((part) => part === ".." || part === "");
}

// The model file the manifest names, as a path inside the bundle that the manifest also lists (so hashed).
export function modelPath(manifest) {
  const p = (manifest.model && manifest.model.file) || "model.onnx";
  if (!isInside(p) || !(manifest.files || []).some((f) => f.path === p))
    throw new UsageError(`the manifest's model file ${JSON.stringify(p)} is not a listed file inside the bundle: refusing it`);
  return p;
}

// Each file the manifest lists: inside the bundle, present, its size and SHA-256 as listed
// (`sha256(relativePath)` returns the hex digest; in a page, fetch + crypto.subtle.digest).
export async function verifyFiles(manifest, size, sha256) {
  for (const entry of manifest.files || []) {
    const p = entry.path;
    if (!isInside(p))
      throw new UsageError(`bundle file ${JSON.stringify(p)} is not a path inside the bundle: refusing it`);
    const bytes = await size(p);
    if (bytes === null) throw new UsageError(`bundle file ${p} is missing from the bundle`);
    if (bytes !== entry.bytes || (await sha256(p)) !== entry.sha256)
      throw new UsageError(`bundle file ${p} does not match its manifest hash: it was changed after export`);
  }
}

async function main(argv) {
  const fs = await import("node:fs");
  const path = await import("node:path");
  const url = await import("node:url");
  const args = { dir: path.dirname(url.fileURLToPath(import.meta.url)), threads: 0, numPrompts: 0, json: null, ort: "node" };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--threads") args.threads = parseInt(argv[++i], 10);
    else if (a === "--num-prompts") args.numPrompts = parseInt(argv[++i], 10);
    else if (a === "--json") args.json = argv[++i];
    else if (a === "--ort") args.ort = argv[++i];
    else if (a.startsWith("--")) throw new UsageError(`unknown option ${a}: use [BUNDLE_DIR] [--threads N] [--num-prompts N] [--json FILE] [--ort node|web]`);
    else args.dir = a;
  }
  if (!(args.threads >= 0) || !(args.numPrompts >= 0)) throw new UsageError("--threads and --num-prompts take a whole number >= 0");
  const read = (name) => {
    const file = path.join(args.dir, name);
    if (!fs.existsSync(file)) throw new UsageError(`${file} is missing: pass the bundle folder written by \`edgekd export\``);
    return JSON.parse(fs.readFileSync(file, "utf8"));
  };
  const manifest = read("manifest.json");
  if (manifest.format !== "edgekd-bundle") throw new UsageError(`${args.dir} is not an edgekd bundle (its manifest.json has no "format": "edgekd-bundle")`);
  const crypto = await import("node:crypto");
  await verifyFiles(manifest, async (p) => {
    const stat = fs.statSync(path.join(args.dir, p), { throwIfNoEntry: false });
    return stat && stat.isFile() ? stat.size : null;
  }, (p) => new Promise((resolve, reject) => {
    const hash = crypto.createHash("sha256");
    fs.createReadStream(path.join(args.dir, p)).on("data", (chunk) => hash.update(chunk)).on("error", reject)
      .on("end", () => resolve(hash.digest("hex")));
  }));
  const golden = read("golden.json");
  const modelFile = path.join(args.dir, modelPath(manifest));  // never a path out of the bundle, always a hashed one
  if (!["node", "web"].includes(args.ort)) throw new UsageError(`--ort ${args.ort}: node (onnxruntime-node) or web (onnxruntime-web's WebAssembly)`);
  const pkg = `onnxruntime-${args.ort}`;
  let ort;
  try {  // beside the app (node_modules up the tree), else where NODE_PATH says
    ort = await import(pkg);
  } catch {
    try {
      ort = (await import("node:module")).createRequire(import.meta.url)(pkg);
    } catch {
      throw new UsageError(`${pkg} is not installed here: npm install --ignore-scripts ${pkg} (or set NODE_PATH to its node_modules)`);
    }
  }
  ort = ort.default || ort;
  let session;
  if (args.ort === "web") {  // the WebAssembly CPU kernels, single-threaded as in a page without cross-origin isolation
    ort.env.wasm.numThreads = 1;
    session = await ort.InferenceSession.create(new Uint8Array(fs.readFileSync(modelFile)), { executionProviders: ["wasm"] });
  } else {
    session = await ort.InferenceSession.create(modelFile, { executionProviders: ["cpu"], ...(args.threads ? { intraOpNumThreads: args.threads } : {}) });
  }
  const { figures } = await replay(ort, session, manifest, golden, { numPrompts: args.numPrompts, log: (m) => console.log(m) });
  const f = (x, d = 3) => x.toFixed(d);
  console.log(`golden prompts / answer positions  ${figures.prompts} / ${figures.positions}`);
  console.log(`top-1 agreement                    ${f(figures.top1)}`);
  console.log(`KL on the top-k (lower bound), nats ${f(figures.kl_mean, 4)}`);
  console.log(`perplexity ratio                   ${f(figures.ppl_ratio)}`);
  console.log(`greedy answers identical           ${f(figures.greedy_exact, 2)}`);
  console.log(`greedy common prefix, tokens       ${f(figures.greedy_prefix_tokens, 1)} of ${figures.answer_tokens}`);
  console.log(`model size                         ${f(figures.size_mb, 1)} MB`);
  console.log(`decode, batch 1 (in the greedy replay) ${f(figures.decode_tokens_per_s, 1)} tokens/s (${pkg} ${ort.env.versions.common})`);
  const gates = applyGates((manifest.target || {}).gates, figures);
  for (const g of gates) console.log(`${g.passed ? "PASS" : "FAIL"} ${g.line}`);
  const passed = gates.every((g) => g.passed);
  console.log(passed ? `all gates pass (${gates.length}, from the bundle's own manifest (target ${(manifest.target || {}).name}))` : "some gates fail");
  if (args.json) fs.writeFileSync(args.json, JSON.stringify({ format: "edgekd-js-check", figures, gates, passed }, null, 1));
  return passed ? 0 : 1;
}

if (typeof process !== "undefined" && process.argv[1] && import.meta.url === (await import("node:url")).pathToFileURL(process.argv[1]).href) {
  main(process.argv.slice(2)).then((code) => process.exit(code), (e) => {
    console.error(`error: ${e instanceof UsageError ? e.message : e.stack || e}`);
    process.exit(e instanceof UsageError ? 2 : 3);
  });
}

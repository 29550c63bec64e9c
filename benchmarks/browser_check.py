"""The bundle's golden replay (its check.mjs) in a real headless Chromium, on onnxruntime-web's WebAssembly.

    make js-deps                      # onnxruntime-web into .cache/js
    apt-get install chromium          # Debian's package
    python benchmarks/browser_check.py runs/bench/teacher-cpu --num-prompts 4 [--webgpu] [--json FILE]

A local server serves the bundle, onnxruntime-web's dist folder and one page. The page imports
check.mjs from the bundle, fetches manifest.json, golden.json and the model, and runs `replay` and
`applyGates` with onnxruntime-web in the page. It posts the figures back, and this script prints
them. Exit code: 0 if every golden gate passes, 1 if one fails, 2 if the page failed or timed out.
The model is the bundle's own file, as an app's page would fetch it.
"""

from __future__ import annotations

import argparse
import http.server
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORT_WEB = ROOT / ".cache" / "js" / "node_modules" / "onnxruntime-web" / "dist"

PAGE = """<!doctype html><meta charset="utf-8"><title>edgekd check</title>
<script type="module">
import * as ort from "/ort/ORT_BUILD";
import { replay, applyGates, modelPath } from "/bundle/check.mjs";
ort.env.wasm.wasmPaths = "/ort/";
ort.env.wasm.numThreads = 1;  // no cross-origin isolation on this page: one thread, as most pages run
const post = (o) => fetch("/result", { method: "POST", body: JSON.stringify(o) });
try {
  const manifest = await (await fetch("/bundle/manifest.json")).json();
  const golden = await (await fetch("/bundle/golden.json")).json();
  const bytes = new Uint8Array(await (await fetch("/bundle/" + modelPath(manifest))).arrayBuffer());
  // WebGPU: whether this browser offers an adapter at all (headless Chromium without a GPU does not)
  const adapter = navigator.gpu ? await navigator.gpu.requestAdapter().catch(() => null) : null;
  const info = adapter && adapter.info ? [adapter.info.vendor, adapter.info.architecture, adapter.info.description].filter(Boolean).join(" ") : "";
  const webgpu = !navigator.gpu ? "navigator.gpu is absent" : adapter ? `adapter ${info || "(no info)"}` : "navigator.gpu offers no adapter";
  const runs = {};
  for (const ep of EPS) {
    if (ep === "webgpu" && !adapter) { runs[ep] = { error: webgpu }; continue; }
    try {
      const session = await ort.InferenceSession.create(bytes, { executionProviders: [ep] });
      const { figures } = await replay(ort, session, manifest, golden, { numPrompts: NUM_PROMPTS });
      runs[ep] = { figures, gates: applyGates(manifest.target.gates, figures) };
    } catch (e) {
      runs[ep] = { error: String((e && e.message) || e) };
    }
    await post({ runs, userAgent: navigator.userAgent, ort: ort.env.versions, webgpu, partial: true });  // kept if a later EP times out
  }
  await post({ runs, userAgent: navigator.userAgent, ort: ort.env.versions, webgpu });
} catch (e) {
  await post({ error: String((e && e.stack) || e) });
}
</script>"""


def serve(bundle: Path, num_prompts: int, webgpu: bool) -> tuple[http.server.ThreadingHTTPServer, dict, threading.Event]:
    result: dict = {}
    done = threading.Event()
    page = PAGE.replace("NUM_PROMPTS", str(num_prompts)).replace("EPS", json.dumps(["wasm", "webgpu"] if webgpu else ["wasm"]))
    page = page.replace("ORT_BUILD", "ort.webgpu.bundle.min.mjs" if webgpu else "ort.bundle.min.mjs").encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            path = self.path.split("?")[0]
            if path == "/page.html":
                body, kind = page, "text/html"
            else:
                base, _, rel = path.lstrip("/").partition("/")
                folder = {"bundle": bundle, "ort": ORT_WEB}.get(base)
                file = (folder / rel).resolve() if folder else None
                if file is None or folder is None or not file.is_relative_to(folder.resolve()) or not file.is_file():
                    self.send_error(404)
                    return
                body = file.read_bytes()
                kind = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
                        ".json": "application/json"}.get(file.suffix, "application/octet-stream")
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            posted = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            result.clear()
            result.update(posted)
            self.send_response(204)
            self.end_headers()
            if not posted.get("partial"):
                done.set()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, result, done


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--webgpu", action="store_true",
                    help="also replay on WebGPU: Chromium started with WebGPU on (SwiftShader's software adapter where no GPU is)")
    args = ap.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None or not ORT_WEB.is_dir() or not (args.bundle / "check.mjs").is_file():
        print("needs chromium (apt-get install chromium), onnxruntime-web (make js-deps) and a bundle with check.mjs", file=sys.stderr)
        return 2
    server, result, done = serve(args.bundle.resolve(), args.num_prompts, args.webgpu)
    gpu_flags = ["--enable-unsafe-webgpu", "--enable-features=Vulkan", "--use-webgpu-adapter=swiftshader", "--use-angle=swiftshader"] \
        if args.webgpu else ["--disable-gpu"]
    url = f"http://127.0.0.1:{server.server_address[1]}/page.html"
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen([browser, "--headless=new", "--no-sandbox", *gpu_flags, f"--user-data-dir={profile}",
                                 "--no-first-run", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            finished = done.wait(args.timeout)
        finally:
            proc.kill()
            proc.wait()
            server.shutdown()
    if not finished and result.get("runs"):  # what finished before the time ran out
        result["runs"]["(timed out)"] = {"error": f"no more results within {args.timeout:.0f} s"}
    elif not finished or "error" in result:
        print(f"the page failed: {result.get('error', f'no result within {args.timeout:.0f} s')}", file=sys.stderr)
        return 2
    print(f"{result['userAgent']}\nonnxruntime-web {result['ort'].get('web') or result['ort'].get('common')}, 1 thread; "
          f"WebGPU: {result.get('webgpu')}")
    passed = True
    for ep, run in result["runs"].items():
        if "error" in run:
            print(f"{ep}: did not run: {run['error']}")
            passed = passed and ep != "wasm"  # no adapter is a fact about the machine, not a failed gate
            continue
        f = run["figures"]
        print(f"{ep}: golden prompts {f['prompts']}, positions {f['positions']}: top-1 {f['top1']:.3f}, KL {f['kl_mean']:.4f}, "
              f"perplexity ratio {f['ppl_ratio']:.3f}, greedy identical {f['greedy_exact']:.2f}, common prefix "
              f"{f['greedy_prefix_tokens']:.1f} of {f['answer_tokens']}, decode {f['decode_tokens_per_s']:.1f} tok/s")
        for g in run["gates"]:
            print(f"  {ep} " + ("PASS " if g["passed"] else "FAIL ") + g["line"])
        passed = passed and all(g["passed"] for g in run["gates"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 2 if not finished else 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

"""The bundle's golden replay (its check.mjs) in a real headless Chromium, on onnxruntime-web's WebAssembly.

    make js-deps                      # onnxruntime-web into .cache/js
    apt-get install chromium          # Debian's package
    python benchmarks/browser_check.py runs/bench/teacher-cpu --num-prompts 4 [--json FILE]

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
import * as ort from "/ort/ort.bundle.min.mjs";
import { replay, applyGates } from "/bundle/check.mjs";
ort.env.wasm.wasmPaths = "/ort/";
ort.env.wasm.numThreads = 1;  // no cross-origin isolation on this page: one thread, as most pages run
const post = (o) => fetch("/result", { method: "POST", body: JSON.stringify(o) });
try {
  const manifest = await (await fetch("/bundle/manifest.json")).json();
  const golden = await (await fetch("/bundle/golden.json")).json();
  const bytes = new Uint8Array(await (await fetch("/bundle/" + manifest.model.file)).arrayBuffer());
  const session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
  const { figures } = await replay(ort, session, manifest, golden, { numPrompts: NUM_PROMPTS });
  await post({ figures, gates: applyGates(manifest.target.gates, figures), userAgent: navigator.userAgent, ort: ort.env.versions });
} catch (e) {
  await post({ error: String((e && e.stack) || e) });
}
</script>"""


def serve(bundle: Path, num_prompts: int) -> tuple[http.server.ThreadingHTTPServer, dict, threading.Event]:
    result: dict = {}
    done = threading.Event()
    page = PAGE.replace("NUM_PROMPTS", str(num_prompts)).encode()

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
            result.update(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()
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
    args = ap.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None or not ORT_WEB.is_dir() or not (args.bundle / "check.mjs").is_file():
        print("needs chromium (apt-get install chromium), onnxruntime-web (make js-deps) and a bundle with check.mjs", file=sys.stderr)
        return 2
    server, result, done = serve(args.bundle.resolve(), args.num_prompts)
    url = f"http://127.0.0.1:{server.server_address[1]}/page.html"
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen([browser, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                                 "--no-first-run", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            finished = done.wait(args.timeout)
        finally:
            proc.kill()
            proc.wait()
            server.shutdown()
    if not finished or "error" in result:
        print(f"the page failed: {result.get('error', f'no result within {args.timeout:.0f} s')}", file=sys.stderr)
        return 2
    f = result["figures"]
    print(f"{result['userAgent']}\nonnxruntime-web {result['ort'].get('web') or result['ort'].get('common')}, WebAssembly, 1 thread")
    print(f"golden prompts {f['prompts']}, positions {f['positions']}: top-1 {f['top1']:.3f}, KL {f['kl_mean']:.4f}, "
          f"perplexity ratio {f['ppl_ratio']:.3f}, greedy identical {f['greedy_exact']:.2f}, common prefix "
          f"{f['greedy_prefix_tokens']:.1f} of {f['answer_tokens']}, decode {f['decode_tokens_per_s']:.1f} tok/s")
    for g in result["gates"]:
        print(("PASS " if g["passed"] else "FAIL ") + g["line"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if all(g["passed"] for g in result["gates"]) else 1


if __name__ == "__main__":
    sys.exit(main())

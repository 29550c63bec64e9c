"""A bundle's chat template, rendered as transformers renders it, and bounded: a template is data
from the bundle, so what it builds and how long it runs are capped, and anything it raises is
the bundle's fault (one ``UsageError``), never a crash or a hang of edgekd's."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekd.device.errors import UsageError, first_line
from edgekd.device.io import read_json


def _special_token(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


TEMPLATE_MAX_CHARS = 1 << 20  # a rendered prompt (or any string a template builds) longer than any context
TEMPLATE_MAX_SECONDS = 10.0  # rendering a chat template takes milliseconds; a template that loops for ever is bad input


TEMPLATE_MAX_MEMORY = 1 << 30  # bytes of address space a template may add while it renders


class TemplateTooSlow(BaseException):  # not an Exception: nothing inside jinja2 may swallow it
    pass


@contextlib.contextmanager
def _bounded(seconds: float, memory: int) -> Iterator[None]:
    """Raise ``TemplateTooSlow`` in the block after ``seconds`` (SIGALRM) and ``MemoryError`` where
    it would grow the address space by over ``memory`` bytes (RLIMIT_AS); an outer timer and
    limit are restored. Main thread on Linux only; elsewhere the block runs as it is, still
    bounded in what ``*``, ``**`` and ``+`` build."""
    try:
        import resource

        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except (ImportError, OSError, ValueError, IndexError):
        pages = None
    if pages is None or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TemplateTooSlow()

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = pages * resource.getpagesize() + memory
    old = signal.signal(signal.SIGALRM, expire)
    outer = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        if hard == resource.RLIM_INFINITY or cap < hard:
            resource.setrlimit(resource.RLIMIT_AS, (cap if soft == resource.RLIM_INFINITY else min(cap, soft), hard))
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.setitimer(signal.ITIMER_REAL, *outer)
        signal.signal(signal.SIGALRM, old)


def _bounded_sandbox():
    """jinja2's immutable sandbox (no attribute tricks, ``range`` capped at 100,000), where ``*``,
    ``**`` and ``+`` also refuse to build a value over ``TEMPLATE_MAX_CHARS``."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise SecurityError(f"the template raises a number to the power {right}")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > TEMPLATE_MAX_CHARS:
                        raise SecurityError(f"the template builds a value of {len(seq) * n:,} items")
            if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)) \
                    and len(left) + len(right) > TEMPLATE_MAX_CHARS:
                raise SecurityError(f"the template builds a value of {len(left) + len(right):,} items")
            if operator == "%" and isinstance(left, str) and re.search(r"%[-+ #0]*\d{7,}", left):
                raise SecurityError("the template formats a value of over a million characters")
            return super().call_binop(context, operator, left, right)

    return BoundedSandbox


class ChatTemplate:
    """The bundle's chat template, rendered with jinja2 as transformers does (sandboxed,
    ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``, ``strftime_now``), bounded
    in what it builds (``TEMPLATE_MAX_CHARS``) and how long it runs (``TEMPLATE_MAX_SECONDS``)."""

    def __init__(self, source: str, special_tokens: dict[str, str | None]):
        from jinja2 import ext

        def raise_exception(message):
            raise UsageError(f"the bundle's chat template refused the messages: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt):
            return time.strftime(fmt)

        env = _bounded_sandbox()(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        self.source = source
        self.template = env.from_string(source)
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text; a template that fails, is refused by the sandbox, builds too much or
        runs too long is bad input (the bundle's), one ``UsageError``."""
        try:
            with _bounded(TEMPLATE_MAX_SECONDS, TEMPLATE_MAX_MEMORY):
                text = self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except UsageError:
            raise
        except TemplateTooSlow:
            raise UsageError(f"the bundle's chat template ran for over {TEMPLATE_MAX_SECONDS:g} s: fix it, or pass --raw") from None
        except MemoryError:
            raise UsageError(f"the bundle's chat template needed over {TEMPLATE_MAX_MEMORY >> 20} MiB: fix it, or pass --raw") from None
        except (Exception, RecursionError) as e:  # the template is data from the bundle: anything it raises is its fault
            raise UsageError(f"the bundle's chat template failed ({type(e).__name__}: {first_line(e, 160)}): fix it, or pass --raw") from None
        if len(text) > TEMPLATE_MAX_CHARS:
            raise UsageError(f"the bundle's chat template made a prompt of {len(text):,} characters: fix it, or pass --raw")
        return text


def load_chat_template(root: Path) -> ChatTemplate | None:
    """From ``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``; None without one."""
    cfg_path = root / "tokenizer_config.json"
    cfg = read_json(cfg_path, ": re-export the bundle") if cfg_path.is_file() else {}
    if not isinstance(cfg, dict):
        raise UsageError(f"{cfg_path} must hold a JSON object, not {type(cfg).__name__}: re-export the bundle")
    source = None
    if (root / "chat_template.jinja").is_file():
        source = (root / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(cfg.get("chat_template"), str):
        source = cfg["chat_template"]
    elif isinstance(cfg.get("chat_template"), list):  # named templates: use "default"
        named = {t.get("name"): t.get("template") for t in cfg["chat_template"] if isinstance(t, dict)}
        source = named.get("default")
    if not source:
        return None
    specials = {k: _special_token(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    try:
        return ChatTemplate(source, specials)
    except Exception as e:  # jinja2's TemplateSyntaxError and friends
        raise UsageError(f"the chat template in {root} does not parse ({type(e).__name__}: {e}): re-export the bundle") from None

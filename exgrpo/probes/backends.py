"""Chat backends for LLM teachers: one message list in, one `Reply` out, thread-safe.

* `HTTPBackend`: OpenAI-compatible `/chat/completions` (vLLM, SGLang, TGI servers, hosted APIs),
  standard library only.
* `TransformersBackend` and `VLLMBackend`: local models, which want batches; `MicroBatcher` turns
  the pipeline's many concurrent single requests into batches for them.

Failure policy (the pipeline relies on it):
* a reply that is wrong for this one request (HTTP 400/413/422, malformed JSON, empty content) is
  a `Reply` with `error` set: the probe is recorded as failed and the run goes on;
* a server that keeps failing (429, 5xx, time-outs, refused connections after all retries) or
  refuses us outright (401/403/404: wrong key, URL or model) raises `TeacherUnavailable`, which
  stops the run; the work already written stays.
"""
from __future__ import annotations

import json
import os
import queue
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from http.client import HTTPException
from typing import Any, Protocol

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Reply:
    text: str | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


class TeacherUnavailable(RuntimeError):
    """The teacher cannot be reached or refuses every request; stop the run."""


class ChatBackend(Protocol):
    fingerprint: str  # the settings that change outputs (model, temperature, ...), not secrets

    def complete(self, messages: Messages) -> Reply: ...


# ---------------------------------------------------------------- HTTP

@dataclass(frozen=True)
class HTTPSettings:
    base_url: str                      # e.g. http://127.0.0.1:8000/v1
    model: str
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable; empty/unset: no auth
    max_concurrency: int = 8
    timeout_s: float = 120.0           # the whole request (connect, wait, read), give or take one socket read
    max_retries: int = 5               # retries after the first attempt
    backoff_s: float = 1.0             # first back-off; doubles per retry, with jitter
    backoff_max_s: float = 60.0
    temperature: float = 0.0
    max_tokens: int = 1024
    seed: int | None = None


class HTTPBackend:
    def __init__(self, s: HTTPSettings, sleep: Callable[[float], None] = time.sleep):
        if not s.base_url.startswith(("http://", "https://")):
            raise ValueError(f"teacher base URL must start with http:// or https://, got {s.base_url!r}")
        if not s.timeout_s > 0:
            raise ValueError(f"--timeout-s must be > 0, got {s.timeout_s}")
        if s.max_retries < 0 or s.max_concurrency < 1:
            raise ValueError(f"--max-retries must be >= 0 and --concurrency >= 1, got {s.max_retries} and "
                             f"{s.max_concurrency}")
        self.s = s
        self.url = s.base_url.rstrip("/") + "/chat/completions"
        # The teacher is its model and sampling settings, not where it is served: the same model behind another
        # port or host reuses the work done (the resume keys hold this), and does not append a second record
        # for every question.
        self.fingerprint = json.dumps({"backend": "http", "model": s.model, "temperature": s.temperature,
                                       "max_tokens": s.max_tokens, "seed": s.seed}, sort_keys=True)
        self._slots = threading.BoundedSemaphore(max(1, s.max_concurrency))
        self._sleep = sleep

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        key = os.environ.get(self.s.api_key_env, "") if self.s.api_key_env else ""
        if key:
            h["Authorization"] = f"Bearer {key}"
        return h

    def complete(self, messages: Messages) -> Reply:
        body: dict[str, Any] = {"model": self.s.model, "messages": messages,
                                "temperature": self.s.temperature, "max_tokens": self.s.max_tokens}
        if self.s.seed is not None:
            body["seed"] = self.s.seed
        data = json.dumps(body).encode()
        last = "no attempt made"
        for attempt in range(self.s.max_retries + 1):
            wait: float | None = None
            try:
                with self._slots:
                    req = urllib.request.Request(self.url, data=data, headers=self._headers(), method="POST")
                    deadline = time.monotonic() + self.s.timeout_s
                    with urllib.request.urlopen(req, timeout=self.s.timeout_s) as resp:
                        raw = _read_by(resp, deadline)
                return parse_chat_response(raw)
            except urllib.error.HTTPError as e:
                detail = _snippet(e)
                if e.code == 429 or e.code >= 500:
                    last = f"HTTP {e.code} {detail}".strip()
                    wait = _retry_after(e)
                elif e.code in (401, 403, 404):
                    raise TeacherUnavailable(
                        f"teacher at {self.url} refused the request with HTTP {e.code} {detail}; check the "
                        f"base URL, the model name ({self.s.model!r}) and the API key in "
                        f"${self.s.api_key_env}") from None
                else:
                    # Another 4xx is about this request (too long, bad parameter): retrying cannot help.
                    return Reply(None, f"HTTP {e.code} {detail}".strip())
            except TimeoutError:
                last = f"timed out after {self.s.timeout_s:g} s"
            except urllib.error.URLError as e:
                if isinstance(e.reason, TimeoutError):
                    last = f"timed out after {self.s.timeout_s:g} s"
                else:
                    last = f"cannot connect ({e.reason})"
            except (ConnectionError, HTTPException, OSError) as e:
                last = f"connection failed ({type(e).__name__}: {e})"
            if attempt < self.s.max_retries:
                backoff = min(self.s.backoff_max_s, self.s.backoff_s * 2 ** attempt)
                self._sleep(wait if wait is not None else backoff * random.uniform(0.5, 1.0))
        raise TeacherUnavailable(
            f"teacher at {self.url} failed {self.s.max_retries + 1} times; last error: {last}")


def _read_by(resp, deadline: float) -> bytes:
    """The body, read in chunks so that a server trickling bytes cannot hold a request past its deadline (each
    socket read is bounded by the time-out too, so the overrun is at most one read)."""
    parts = []
    while chunk := resp.read1(1 << 16):
        parts.append(chunk)
        if time.monotonic() > deadline:
            raise TimeoutError("the whole request took longer than its time-out")
    return b"".join(parts)


def _snippet(e: urllib.error.HTTPError) -> str:
    try:
        return e.read()[:200].decode("utf-8", "replace").strip()
    except Exception:  # the body is only for the message
        return ""


def _retry_after(e: urllib.error.HTTPError) -> float | None:
    v = e.headers.get("Retry-After") if e.headers else None
    try:
        return min(60.0, max(0.0, float(v))) if v is not None else None
    except ValueError:
        return None


def parse_chat_response(raw: bytes) -> Reply:
    """The first choice's message content, or a `Reply` naming what is wrong with the body."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return Reply(None, f"malformed response: not JSON ({raw[:80]!r})")
    try:
        content = obj["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return Reply(None, f"malformed response: no choices[0].message.content ({str(obj)[:80]})")
    if not isinstance(content, str):
        return Reply(None, f"malformed response: content is {type(content).__name__}")
    if not content.strip():
        return Reply(None, "empty response")
    return Reply(content)


# ---------------------------------------------------------------- local batch backends

class MicroBatcher:
    """Collects single requests from many threads into batches for a batch function.

    A request waits at most `wait_s` for company; one background thread (started on first use,
    never at import) runs the batches, so the wrapped model is only ever called from one thread."""

    def __init__(self, complete_batch: Callable[[list[Messages]], list[Reply]], max_batch: int = 32,
                 wait_s: float = 0.02):
        self._fn, self._max, self._wait = complete_batch, max(1, max_batch), wait_s
        self._q: queue.Queue[tuple[Messages, Future] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def complete(self, messages: Messages) -> Reply:
        fut: Future = Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="exgrpo-microbatcher", daemon=True)
                self._thread.start()
        self._q.put((messages, fut))
        return fut.result()

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            batch = [item]
            deadline = time.monotonic() + self._wait
            while len(batch) < self._max:
                try:
                    nxt = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)
                    break
                batch.append(nxt)
            try:
                replies = self._fn([m for m, _ in batch])
                for (_, f), r in zip(batch, replies, strict=True):
                    f.set_result(r)
            except BaseException as e:  # hand the error to every waiting caller
                for _, f in batch:
                    f.set_exception(e)

    def close(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=5)


class TransformersBackend:
    """A local transformers causal LM, greedy, prompts rendered with its chat template."""

    def __init__(self, model_dir: str, max_new_tokens: int = 512, batch_size: int = 8, device: str = "cpu"):
        from exgrpo.probes.local_model import LocalChatModel  # torch / transformers only when used
        self._model = LocalChatModel(model_dir, max_new_tokens=max_new_tokens, device=device)
        self._batcher = MicroBatcher(self._batch, max_batch=batch_size)
        self.fingerprint = json.dumps({"backend": "transformers", "model": model_dir,
                                       "max_new_tokens": max_new_tokens, "greedy": True}, sort_keys=True)

    def _batch(self, convs: list[Messages]) -> list[Reply]:
        return [Reply(t) if t.strip() else Reply(None, "empty response") for t in self._model.generate(convs)]

    def complete(self, messages: Messages) -> Reply:
        return self._batcher.complete(messages)


class VLLMBackend:
    """vLLM's offline engine (`vllm.LLM.chat`). Optional: vllm is imported here, not at module load."""

    def __init__(self, model: str, temperature: float = 0.0, max_tokens: int = 1024, batch_size: int = 64,
                 seed: int | None = None, **engine_kwargs: Any):
        try:
            import vllm  # noqa: PLC0415 - optional GPU dependency
        except ImportError as e:
            raise ImportError("the vllm teacher needs the 'vllm' package (pip install 'exgrpo[gpu]'), "
                              "or serve the model and use --teacher http") from e
        self._llm = vllm.LLM(model=model, **engine_kwargs)
        self._params = vllm.SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed)
        self._batcher = MicroBatcher(self._batch, max_batch=batch_size)
        self.fingerprint = json.dumps({"backend": "vllm", "model": model, "temperature": temperature,
                                       "max_tokens": max_tokens, "seed": seed}, sort_keys=True)

    def _batch(self, convs: Sequence[Messages]) -> list[Reply]:
        outs = self._llm.chat(list(convs), self._params, use_tqdm=False)
        texts = [o.outputs[0].text if o.outputs else "" for o in outs]
        return [Reply(t) if t.strip() else Reply(None, "empty response") for t in texts]

    def complete(self, messages: Messages) -> Reply:
        return self._batcher.complete(messages)

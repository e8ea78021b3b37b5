"""The VIEScore judge: a vision-language model behind any OpenAI-compatible chat endpoint (spec §C.6, §D.2).

Two questions per edit, as the paper asked them: semantic consistency (SC: [edit success, over-editing]) with
the source and the edited image, perceptual quality (PQ: [naturalness, artifacts]) with the edited image only.
The prompt texts are VIEScore's published 0-shot prompts (TIGER-AI-Lab/VIEScore, ``vie_prompts.py``), kept
verbatim for metric parity. Unlike the original, a reply is parsed strictly (a JSON object whose ``score`` is a
list of two numbers in [0, 10]), failures are retried with back-off inside a total deadline, and an edit whose
judging finally fails is reported as failed, never given an invented score.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
from PIL import Image

from earl.config import ConfigError
from earl.rewards import ZERO, Score, Verifier

CONTEXT = """You are a professional digital artist. You will have to evaluate the effectiveness of the AI-generated image(s) based on given rules.
All the input images are AI-generated. All human in the images are AI-generated too. so you need not worry about the privacy confidentials.

You will have to give your output in this way (Keep your reasoning concise and short.):
{
"score" : [...],
"reasoning" : "..."
}"""

TWO_IMAGE_EDIT_RULE = """RULES:

Two images will be provided: The first being the original AI-generated image and the second being an edited version of the first.
The objective is to evaluate how successfully the editing instruction has been executed in the second image.

Note that sometimes the two images might look identical due to the failure of image edit.
"""

SC_RULE = """
From scale 1 to 10: 
A score from 1 to 10 will be given based on the success of the editing. (1 indicates that the scene in the edited image does not follow the editing instruction at all. 10 indicates that the scene in the edited image follow the editing instruction text perfectly.)
A second score from 1 to 10 will rate the degree of overediting in the second image. (1 indicates that the scene in the edited image is completely different from the original. 10 indicates that the edited image can be recognized as a minimal edited yet effective version of original.)
Put the score in a list such that output score = [score1, score2], where 'score1' evaluates the editing success and 'score2' evaluates the degree of overediting.

Editing instruction: <instruction>
"""

PQ_RULE = """RULES:

The image is an AI-generated image.
The objective is to evaluate how successfully the image has been generated.

From scale 1 to 10: 
A score from 1 to 10 will be given based on image naturalness. 
(
    1 indicates that the scene in the image does not look natural at all or give a unnatural feeling such as wrong sense of distance, or wrong shadow, or wrong lighting. 
    10 indicates that the image looks natural.
)
A second score from 1 to 10 will rate the image artifacts. 
(
    1 indicates that the image contains a large portion of distortion, or watermark, or scratches, or blurred faces, or unusual body parts, or subjects not harmonized. 
    10 indicates the image has no artifacts.
)
Put the score in a list such that output score = [naturalness, artifacts]
"""


class JudgeReplyError(ValueError):
    """The judge answered, but not with a JSON object holding two scores in [0, 10]."""


def sc_prompt(instruction: str) -> str:
    return "\n".join([CONTEXT, TWO_IMAGE_EDIT_RULE, SC_RULE.replace("<instruction>", instruction)])


def pq_prompt() -> str:
    return "\n".join([CONTEXT, PQ_RULE])


def parse_scores(text: str) -> list[float]:
    """The two scores of a reply; :class:`JudgeReplyError` for prose, one score, or a value outside [0, 10]."""
    match = re.search(r"\{.*\}", text, re.S)
    if match is None:
        raise JudgeReplyError(f"no JSON object in the reply: {text[:80]!r}")
    try:
        scores = json.loads(match.group(0))["score"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise JudgeReplyError(f"reply is not {{'score': [...]}}: {error}") from None
    if not isinstance(scores, list) or len(scores) != 2 or not all(isinstance(s, (int, float)) for s in scores):
        raise JudgeReplyError(f"expected two scores, got {scores!r}")
    if not all(0 <= s <= 10 for s in scores):
        raise JudgeReplyError(f"scores outside [0, 10]: {scores!r}")
    return [float(s) for s in scores]


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def base_url_of(configured: str | None, key: str = "rl.reward") -> str:
    """The endpoint from config or ``EARL_JUDGE_BASE_URL`` (which :func:`served` sets); it must end in ``/v1``."""
    url = configured or os.environ.get("EARL_JUDGE_BASE_URL")
    if not url:
        raise ConfigError(f"{key}.base_url: not set and EARL_JUDGE_BASE_URL is empty")
    if not url.rstrip("/").endswith("/v1"):
        raise ConfigError(f"{key}.base_url: {url!r} must end in /v1 (e.g. http://judge-host:8000/v1)")
    return url.rstrip("/")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served(spec, log: Path, key: str) -> Iterator[None]:
    """Run the judge server of ``spec.serve`` (if any) for the duration of the block.

    The server gets a free port, the last ``serve.gpus`` of the job's GPUs and its own process group; the block
    sees its URL in ``EARL_JUDGE_BASE_URL`` and the remaining GPUs in ``CUDA_VISIBLE_DEVICES`` (inherited by
    torchrun's workers). It is stopped (SIGTERM, then SIGKILL) however the block ends. A server that exits or
    does not answer ``GET /v1/models`` in time is a one-line error pointing at its log.
    """
    server = getattr(spec, "serve", None)
    if server is None:
        yield
        return
    port = free_port()
    env = dict(os.environ)
    if server.gpus:
        devices = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(torch.cuda.device_count())))).split(",")
        if len(devices) <= server.gpus:
            raise ConfigError(f"{key}.serve.gpus: {server.gpus} of the job's {len(devices)} GPU(s) leaves none for the step")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[-server.gpus:])
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices[: -server.gpus])
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(server.command.format(port=port), shell=True, stdout=out, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + server.ready_timeout_s
        while not _answers(url):
            if process.poll() is not None:
                raise ConfigError(f"{key}.serve: the judge server exited with status {process.returncode} (log: {log})")
            if time.monotonic() > deadline:
                raise ConfigError(f"{key}.serve: no answer from {url}/models within {server.ready_timeout_s:.0f} s (log: {log})")
            time.sleep(0.5)
        os.environ["EARL_JUDGE_BASE_URL"] = url
        yield
    finally:
        _stop(process)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


def _stop(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        if process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait)


class AnswerCache:
    """Parsed judge answers on disk, one small JSON file per question, so a rerun never pays twice.

    The key is a hash of the judge model, the prompt text and the exact image bytes sent. One file per key
    (written to a temporary name and renamed) is safe for many concurrent jobs on a shared file system, where
    a single SQLite or lock file is not. Only usable answers are stored: a failure is asked again next time.
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.hits = 0

    @staticmethod
    def key(model: str | None, text: str, urls: list[str]) -> str:
        digest = hashlib.sha256(json.dumps([model, text]).encode())
        for url in urls:
            digest.update(hashlib.sha256(url.encode()).digest())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str) -> list[float] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        self.hits += 1
        return json.loads(path.read_text())["score"]

    def put(self, key: str, scores: list[float], reply: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        tmp.write_text(json.dumps({"score": scores, "reply": reply}))
        os.replace(tmp, path)


class VIEScoreJudge:
    """SC and PQ from an OpenAI-compatible endpoint, concurrent, with bounded retries and a total deadline."""

    needs_source_image = True  # the SC question shows the source beside the edit

    def __init__(self, spec, cache: AnswerCache | None = None, key: str = "rl.reward"):
        self.spec = spec
        # the key only from the environment, never from config or any file
        self.client = openai.OpenAI(base_url=base_url_of(spec.base_url, key), api_key=os.environ.get(spec.api_key_env, "NONE"),
                                    timeout=spec.timeout_s, max_retries=0)
        self.cache = cache if spec.cache else None
        self.faults = 0  # failed requests (timeouts, HTTP errors, unparseable replies), retried or not
        self.requests = 0  # requests sent (cache hits send none)
        self._lock = threading.Lock()

    def _ask(self, text: str, images: list[Image.Image], deadline: float) -> list[float] | None:
        urls = [data_url(i) for i in images]
        key = AnswerCache.key(self.spec.model, text, urls) if self.cache else None
        if self.cache and (cached := self.cache.get(key)) is not None:
            return cached
        content = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
        for attempt in range(self.spec.max_attempts):
            if time.monotonic() > deadline:
                return None
            try:
                with self._lock:
                    self.requests += 1
                reply = self.client.chat.completions.create(
                    model=self.spec.model, messages=[{"role": "user", "content": content}], max_tokens=self.spec.max_tokens,
                )
                answer = reply.choices[0].message.content or ""
                scores = parse_scores(answer)
                if self.cache:
                    self.cache.put(key, scores, answer)
                return scores
            except (openai.APIError, JudgeReplyError):
                with self._lock:
                    self.faults += 1
                time.sleep(min(self.spec.backoff_s * 2**attempt, max(0.0, deadline - time.monotonic())))
        return None

    def _one(self, edited: Image.Image | None, source: Image.Image, instruction: str, deadline: float) -> Score:
        if edited is None:
            return ZERO  # malformed or unfinished: 0 without asking the judge
        sc = self._ask(sc_prompt(instruction), [source, edited], deadline)
        pq = self._ask(pq_prompt(), [edited], deadline) if sc is not None else None
        if sc is None or pq is None:
            return Score(0.0, 0.0, failed=True)
        return Score(min(sc), min(pq), subscores=(*sc, *pq))

    def score_many(self, edited: list[Image.Image | None], rows: list[dict], sources: list[Image.Image]) -> list[Score]:
        deadline = time.monotonic() + self.spec.deadline_s
        with ThreadPoolExecutor(self.spec.max_concurrency) as pool:
            return list(pool.map(lambda a: self._one(*a, deadline), zip(edited, sources, [r["instruction"] for r in rows])))


def make_judge(spec, source, key: str, cache: AnswerCache | None = None):
    """The configured judge (``rl.reward`` or ``evaluate.judge``) for rows of a dataset with this ``source``.

    The verifier needs a generated shapes dataset (it reads the scene ground truth); a VIEScore judge serves any.
    """
    if spec.kind == "verifier":
        if source.kind != "shapes":
            raise ConfigError(f"{key}.kind: verifier needs a generated shapes dataset, got a {source.kind!r} source")
        return Verifier(source)
    return VIEScoreJudge(spec, cache, key)


def check_judge(spec, sources, key: str) -> None:
    """Start-up check of a judge for rows of these dataset sources: one line for a wrong kind or URL.

    A judge the step serves itself has no URL yet; :func:`served` checks that it answers.
    """
    for source in sources:
        if spec.kind == "verifier" or spec.serve is None:
            make_judge(spec, source, key)

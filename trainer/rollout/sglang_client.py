"""The SGLang engine: a client of running ``sglang.launch_server`` instances (the production path).

Requests go concurrently (a thread pool) to several data-parallel server URLs or to one
sglang-router URL. Every request of a prompt, its think request and all its summary forks,
goes to the same server (the routing key is the prompt), so the forks find the finished trace in
that server's radix cache. Connection errors, timeouts, 5xx answers and malformed bodies are
retried with exponential backoff, and so are requests the server aborted; after the last try the engine raises
:class:`SGLangServerError` naming the server and the cause. A 4xx answer is not retried.

Weight sync saves the policy as safetensors into ``weights_dir`` and asks every server to
``/update_weights_from_disk`` from there (which flushes its cache), or, after
:meth:`SGLangEngine.init_weight_transfer` (multi-node runs without a shared file system), broadcasts
it over a process group the servers join (``/update_weights_from_distributed``); replies whose
``meta_info.weight_version`` names an older version are refused.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import re
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
import torch

from trainer.budgets import BudgetSchedule
from trainer.rollout.base import (
    SUMMARY_MAX_NEW_TOKENS,
    GenerationOutput,
    GenerationRequest,
    RolloutEngine,
    SamplingParams,
    SummaryBatch,
    ThinkingBatch,
)
from trainer.rollout.sglang_info import (
    ServerInfo,
    SGLangServerError,
    check_dp_size,
    check_request,
    http_call,
    read_server_info,
)
from trainer.rollout.sglang_protocol import (
    AbortedRequest,
    MalformedResponse,
    batch_payload,
    deterministic_parts,
    generate_payload,
    merge_outputs,
    parse_batch_response,
    parse_generate_response,
)
from trainer.rollout.weight_transfer import (
    broadcast_bucket,
    cast_floats,
    init_weights_group,
    tensor_metadata,
    weight_buckets,
)

logger = logging.getLogger(__name__)
# One sample of SGLang's prefill/decode token counter: its mode label and its value.
_REALTIME_TOKENS = re.compile(r'^sglang:realtime_tokens_total\{[^}]*mode="([a-z_]+)"[^}]*\}\s+([0-9.eE+-]+)', re.M)


# How long a server may wait for running requests to finish before it flushes its cache (/flush_cache?timeout=).
FLUSH_WAIT_S = 30.0


class SGLangEngine(RolloutEngine):
    """Rollouts served by SGLang over HTTP.

    Args:
        urls: one URL per data-parallel server, or one sglang-router URL.
        tokenizer: the policy's tokenizer (delimiter ids and EOS).
        weights_dir: run folder that weight sync writes the policy into.
        timeout_s: read timeout of one HTTP request.
        max_retries: retries after the first try of a request.
        backoff_s: wait before the first retry; doubles on each further retry.
        max_workers: concurrent requests in flight.
        dp_size: data-parallel replicas behind each URL (``--dp-size``); requests name their replica.
            Checked against each server's own at the first request (:meth:`server_info`).
        deterministic: the servers run deterministic inference (``--enable-deterministic-inference``):
            every request goes as one request per sample, each with its own seed (a fresh random one
            for an unseeded request). None: as each server reports in ``/server_info``.
        eos_token_ids: every id that ends a sequence for this model (its config and generation
            config may name several), besides the tokenizer's.
        sync_dtype: the dtype weights travel in to the servers (saved to disk or broadcast); the
            servers cast what they receive to their own dtype, so bf16 (the default) halves the bytes
            of an fp32 policy for the same served weights. None: the policy's own dtypes.

    Before its first request the engine reads every server's limits (:meth:`server_info`) and
    refuses, with a ValueError before anything is sent, a request the server would refuse (HTTP
    400, which is not retried) or cut short: past its context length less the 2 tokens SGLang
    keeps, or ``min_new_tokens > 0`` on a server that skips tokenizer init (as servers started
    with ``sglang_server_command`` do).
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        tokenizer,
        *,
        weights_dir: str | Path | None = None,
        timeout_s: float = 3600.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 4,
        backoff_s: float = 1.0,
        max_workers: int = 64,
        dp_size: int = 1,
        deterministic: bool | None = None,
        eos_token_ids: Sequence[int] = (),
        sync_dtype: torch.dtype | None = torch.bfloat16,
    ) -> None:
        super().__init__(*self.tokenizer_setup(tokenizer), eos_token_ids=eos_token_ids)
        self.sync_dtype = sync_dtype
        if dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {dp_size}")
        self.dp_size = dp_size
        self.deterministic = deterministic
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("SGLangEngine needs at least one server URL")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"server URL {url!r} must start with http:// or https://")
        self.urls = [url.rstrip("/") for url in self.urls]
        if max_retries < 0 or backoff_s < 0 or timeout_s <= 0 or max_workers < 1:
            raise ValueError(
                f"need max_retries >= 0, backoff_s >= 0, timeout_s > 0, max_workers >= 1; got "
                f"{max_retries}, {backoff_s}, {timeout_s}, {max_workers}"
            )
        self._seeds = random.Random()
        self._info: dict[str, ServerInfo] | None = None
        self._info_lock = threading.Lock()
        self.weights_dir = Path(weights_dir) if weights_dir is not None else None
        self.timeout = (connect_timeout_s, timeout_s)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_workers = max_workers
        self._round_robin = itertools.count()
        self._local = threading.local()
        self._weight_version = 0
        self._warned_no_metrics = False
        self._weights_group = None  # set by init_weight_transfer
        self._weights_device = torch.device("cpu")
        self.weight_bucket_bytes = 512 * 2**20

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _url_for(self, request: GenerationRequest) -> str:
        key = request.routing_key if request.routing_key is not None else next(self._round_robin)
        return self.urls[key % len(self.urls)]

    def _call(
        self, url: str, path: str, method: str = "POST", body: dict | None = None, *, retry: bool = True
    ) -> requests.Response:
        """One HTTP call with retries (none with ``retry=False``: a collective call, such as a weight
        broadcast, must not be sent twice); returns a 2xx response whose body the caller checks."""
        attempts = self.max_retries + 1 if retry else 1
        return http_call(self._session(), url, path, method, body, timeout=self.timeout, attempts=attempts,
                         backoff_s=self.backoff_s)  # fmt: skip

    def server_info(self) -> list[ServerInfo]:
        """Every server's limits and modes, read once (the first request reads them); refuses a
        ``dp_size`` other than the servers' own."""
        with self._info_lock:
            if self._info is None:
                found = read_server_info(self.urls, timeout_s=self.timeout[1], connect_timeout_s=self.timeout[0],
                                         max_retries=self.max_retries, backoff_s=self.backoff_s,
                                         session=self._session())  # fmt: skip
                check_dp_size(found, self.dp_size)
                self._info = {info.url: info for info in found}
            return list(self._info.values())

    def _parts(self, request: GenerationRequest, url: str) -> list[GenerationRequest]:
        """The requests to send ``url`` for ``request``: itself, or one seeded request per sample for a
        deterministic server. Raises ValueError for a request the server would refuse or cut short."""
        self.server_info()
        info = self._info[url]
        check_request(request, info)
        deterministic = self.deterministic if self.deterministic is not None else bool(info.deterministic)
        if not deterministic:
            return [request]
        return deterministic_parts(request, self._fresh_seed)

    def _fresh_seed(self) -> int:
        with self._info_lock:
            return self._seeds.randrange(2**31)

    def _generate_one(self, request: GenerationRequest) -> GenerationOutput:
        url = self._url_for(request)
        parts = self._parts(request, url)
        if len(parts) > 1:  # concurrently: one sample each
            with ThreadPoolExecutor(max_workers=len(parts)) as pool:
                return merge_outputs(list(pool.map(lambda part: self._post_one(part, url), parts)))
        return self._post_one(parts[0], url)

    def _post_one(self, request: GenerationRequest, url: str) -> GenerationOutput:
        body = generate_payload(request, self.dp_size)
        return self._post_generate(url, body, lambda payload: parse_generate_response(payload, request))

    def _generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        """Requests of one routing key and priority, one sample each, as one ``/generate`` batch body.
        (SGLang runs a batch's ``n > 1`` items' prefill warm-ups one after another before any of their
        samples: such requests go as bodies of their own, see :meth:`rollout`.)"""
        if len(requests) == 1:
            return [self._generate_one(requests[0])]
        if any(request.n != 1 for request in requests):
            raise ValueError(f"a /generate batch here holds one-sample requests only, got n={[r.n for r in requests]}")
        url = self._url_for(requests[0])
        sent = [part for request in requests for part in self._parts(request, url)]
        body = batch_payload(sent, self.dp_size)
        return self._post_generate(url, body, lambda payload: parse_batch_response(payload, sent))

    def _post_generate(self, url: str, body: dict, parse):
        """POST a ``/generate`` body and parse the answer; malformed and aborted answers are retried."""
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            response = self._call(url, "/generate", body=body)
            try:
                payload = response.json()
                self._check_weight_version(url, payload)
                return parse(payload)
            except AbortedRequest as error:
                failure = str(error)
            except (ValueError, MalformedResponse) as error:
                failure = f"malformed response: {error}"
            if attempt + 1 < attempts:
                logger.warning("POST %s/generate: %s; retry %d/%d", url, failure, attempt + 1, self.max_retries)
                time.sleep(self.backoff_s * 2**attempt)
        raise SGLangServerError(f"POST {url}/generate failed after {attempts} attempts; last error: {failure}")

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        if not requests:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(requests))) as pool:
            futures = [pool.submit(self._generate_one, request) for request in requests]
            return [future.result() for future in futures]

    def rollout(
        self,
        prompts: Sequence[Sequence[int]],
        group_size: int,
        max_tokens: int,
        schedule: BudgetSchedule,
        num_summaries: int,
        sampling: SamplingParams,
        max_new_tokens: int = SUMMARY_MAX_NEW_TOKENS,
        *,
        window: int = 0,
    ) -> tuple[ThinkingBatch, SummaryBatch]:
        """Streaming forks: each prompt's forks are sent the moment its think request returns, while
        other prompts still think, so a trace is still in the server's radix cache when its forks
        arrive even when the step's traces do not all fit. A fork of several samples goes as a body of
        its own (SGLang would run the prefill warm-ups of a batch's ``n > 1`` items one after
        another before sampling any), a trace's one-sample forks as one batch, all at once, on the
        prompt's server and replica; traces are sent with a higher ``priority`` than forks (start
        servers with ``--radix-eviction-policy priority``).

        ``window``: most prompts thinking at once (0: all); a window keeps the traces the server
        holds for pending forks within its cache when the server itself admits every request.
        """
        if window < 0:
            raise ValueError(f"window must be >= 0 prompts (0: all), got {window}")
        think_requests = self._think_requests(prompts, group_size, max_tokens, sampling)
        if not think_requests:
            return super().rollout(prompts, group_size, max_tokens, schedule, num_summaries, sampling, max_new_tokens)
        gate = threading.Semaphore(window or len(think_requests))
        start, counters = time.perf_counter(), self.prefill_counters()
        traces_back = [0.0] * len(think_requests)

        def think_then_fork(p: int):
            with gate:
                out = self._generate_one(think_requests[p])
            traces_back[p] = time.perf_counter()
            done = self._thinking_batch([think_requests[p]], [out], group_size)
            forks, requests = self._fork_requests(done, p * group_size, schedule, num_summaries, sampling,
                                                  max_new_tokens)  # fmt: skip
            # All of the prompt's bodies at once: one per fork of several samples (a batch of them
            # would wait for each item's prefill warm-up in turn), one per trace for the others.
            groups = {}
            for i, (fork, request) in enumerate(zip(forks, requests, strict=True)):
                groups.setdefault((fork.trace,) if request.n == 1 else (fork.trace, i), []).append(i)
            outputs: list[GenerationOutput | None] = [None] * len(requests)
            with ThreadPoolExecutor(max_workers=len(groups) or 1) as fork_pool:
                answers = {key: fork_pool.submit(self._generate_batch, [requests[i] for i in items])
                           for key, items in groups.items()}  # fmt: skip
                for key, items in groups.items():
                    for i, result in zip(items, answers[key].result(), strict=True):
                        outputs[i] = result
            return out, forks, outputs

        workers = min(self.max_workers, len(think_requests))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = [future.result() for future in [pool.submit(think_then_fork, p) for p in range(len(prompts))]]
        end = time.perf_counter()
        think_outputs = [out for out, _, _ in results]
        forks = [fork for _, per_prompt, _ in results for fork in per_prompt]
        fork_outputs = [out for _, _, per_prompt in results for out in per_prompt]
        last_trace = max(traces_back)
        self.stats.think.add(think_outputs, last_trace - start)
        self.stats.summarize.add(fork_outputs, end - last_trace)
        self.stats.rollout.add([], end - start)
        self.stats.rollout.add_counters(counters, self.prefill_counters())
        traces = self._thinking_batch(think_requests, think_outputs, group_size)
        return traces, self._summary_batch(traces, schedule, forks, fork_outputs, num_summaries)

    def flush_cache(self) -> None:
        """Empty every server's radix cache. SGLang refuses (400) while requests run or wait unless
        ``?timeout=`` lets it wait for them: up to ``FLUSH_WAIT_S`` seconds here."""
        for url in self._servers():
            self._call(url, f"/flush_cache?timeout={FLUSH_WAIT_S:g}")

    def _check_weight_version(self, url: str, payload: Any) -> None:
        """Refuse samples of weights older than the last sync (a server that missed the update)."""
        samples = payload if isinstance(payload, list) else [payload]
        for sample in samples:
            version = sample.get("meta_info", {}).get("weight_version") if isinstance(sample, dict) else None
            if version is not None and self._weight_version and str(version) != str(self._weight_version):
                raise SGLangServerError(
                    f"{url} sampled with weight version {version}, but the policy is at {self._weight_version}: "
                    "the server did not load the last weight update"
                )

    def prefill_counters(self) -> dict[str, float] | None:
        """The servers' own prefill counters (``sglang:realtime_tokens_total`` on ``/metrics``,
        summed over servers and labels); None when a server runs without ``--enable-metrics``."""
        totals = {"prefill_compute": 0.0, "prefill_cache": 0.0}
        for url in dict.fromkeys(self.urls):  # a URL listed twice is one server
            try:
                response = self._session().get(url + "/metrics", timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout):
                return None
            if response.status_code != 200:
                if not self._warned_no_metrics:
                    logger.warning("%s has no /metrics (start it with --enable-metrics): cache figures come from "
                                   "meta_info, which overstate hits for n > 1", url)  # fmt: skip
                    self._warned_no_metrics = True
                return None
            for mode, value in _REALTIME_TOKENS.findall(response.text):
                if mode in totals:
                    totals[mode] += float(value)
        return totals

    def model_info(self) -> dict[str, Any]:
        """``/model_info`` of the first server (``/get_model_info`` is deprecated)."""
        return self._call(self.urls[0], "/model_info", method="GET").json()

    def _servers(self) -> list[str]:
        return list(dict.fromkeys(self.urls))  # a URL listed twice is one server

    def _on_every_server(self, path: str, bodies: dict[str, dict], action: str, *, retry: bool = True) -> None:
        """POST each server its body at once; raise unless every one reports success."""
        with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
            answers = {
                url: pool.submit(self._call, url, path, "POST", body, retry=retry) for url, body in bodies.items()
            }
            results = {url: future.result().json() for url, future in answers.items()}
        for url, answer in results.items():
            if not answer.get("success", False):
                raise SGLangServerError(f"{url} could not {action}: {answer.get('message')}")

    @contextlib.contextmanager
    def _weight_update_session(self):
        """SGLang's weight-update session around loads from tensors or a process group: recent
        servers refuse ``/update_weights_from_distributed`` outside ``/begin_weight_update`` ..
        ``/end_weight_update``; servers that predate sessions answer 404 there and load without one."""
        servers = self._servers()
        opened = []
        try:
            for url in servers:
                try:
                    answer = self._call(url, "/begin_weight_update", "POST", {"selector": "all"}, retry=False).json()
                except SGLangServerError as error:
                    if error.status == 404:  # an SGLang without weight-update sessions
                        continue
                    raise
                if not answer.get("success", False):
                    raise SGLangServerError(f"{url} could not open a weight-update session: {answer.get('message')}")
                opened.append(url)
            yield
        finally:
            failures = []
            for url in opened:  # close what was opened, even when the update failed
                try:
                    answer = self._call(url, "/end_weight_update", "POST", {}, retry=False).json()
                    if not answer.get("success", False):
                        failures.append(f"{url}: {answer.get('message')}")
                except SGLangServerError as error:
                    failures.append(f"{url}: {error}")
            if failures and sys.exc_info()[0] is None:
                raise SGLangServerError(f"could not close the weight-update session: {'; '.join(failures)}")

    def init_weight_transfer(
        self,
        master_address: str,
        master_port: int,
        *,
        ranks_per_server: int = 1,
        backend: str | None = None,
        group_name: str = "anytime_weight_sync",
        bucket_mb: float = 512.0,
    ) -> None:
        """Sync weights over a process group with the servers instead of through a shared disk.

        The trainer (rank 0) and every server rank (``ranks_per_server``: the servers' tensor-parallel
        size) join a group at ``master_address:master_port`` (an address of this machine the servers
        can reach, and a free port); later :meth:`update_weights` calls broadcast the policy in
        buckets of at most ``bucket_mb`` MiB through SGLang's ``/update_weights_from_distributed``.
        ``backend``: ``nccl`` (default with CUDA) or ``gloo``.
        """
        if ranks_per_server < 1 or bucket_mb <= 0:
            raise ValueError(f"need ranks_per_server >= 1 and bucket_mb > 0, got {ranks_per_server}, {bucket_mb}")
        if self.dp_size > 1:
            raise ValueError(
                f"weight sync over a process group needs servers without data-parallel replicas (SGLang asserts "
                f"dp_size == 1 there), got dp_size={self.dp_size}: run one server per replica, or sync from disk"
            )
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        world_size = 1 + ranks_per_server * len(self._servers())
        bodies = {
            url: {"master_address": master_address, "master_port": master_port, "world_size": world_size,
                  "rank_offset": 1 + i * ranks_per_server, "group_name": group_name, "backend": backend}
            for i, url in enumerate(self._servers())
        }  # fmt: skip
        with ThreadPoolExecutor(max_workers=1) as pool:  # the servers join while this rank does
            joining = pool.submit(self._on_every_server, "/init_weights_update_group", bodies,
                                  "join the weight-update group", retry=False)  # fmt: skip
            group = init_weights_group(backend, master_address, master_port, world_size, 0, group_name)
            joining.result()
        self._weights_group, self._weights_group_name = group, group_name
        self._weights_device = (
            torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        )
        self.weight_bucket_bytes = int(bucket_mb * 2**20)

    def _update_weights_distributed(self, model: torch.nn.Module) -> None:
        buckets = weight_buckets(cast_floats(model.state_dict(), self.sync_dtype), self.weight_bucket_bytes)
        # One thread posts each bucket's request (the servers then wait in the broadcast) while this
        # one sends the bucket; the request returns once the servers have loaded it.
        with self._weight_update_session(), ThreadPoolExecutor(max_workers=1) as pool:
            for k, bucket in enumerate(buckets):
                last = k == len(buckets) - 1
                body = {**tensor_metadata(bucket), "group_name": self._weights_group_name, "flush_cache": last}
                if last:  # a server records the version with each bucket: only once every weight is in
                    body["weight_version"] = str(self._weight_version)
                answered = pool.submit(self._on_every_server, "/update_weights_from_distributed",
                                       dict.fromkeys(self._servers(), body),
                                       f"receive weight bucket {k + 1}/{len(buckets)}", retry=False)  # fmt: skip
                broadcast_bucket(bucket, self._weights_group, self._weights_device)
                answered.result()

    def update_weights(self, model: torch.nn.Module) -> None:
        """Load ``model``'s weights on every server: broadcast over the weight-update group when
        :meth:`init_weight_transfer` set one up, else ``save_pretrained`` into ``weights_dir`` and
        ``/update_weights_from_disk`` (both flush the servers' caches)."""
        if self._weights_group is not None:
            start = time.perf_counter()
            self._weight_version += 1
            self._update_weights_distributed(model)
            self.stats.weight_sync_seconds += time.perf_counter() - start
            return
        if self.weights_dir is None:
            raise ValueError("SGLangEngine.update_weights needs weights_dir (the run folder to save the policy in)")
        if not hasattr(model, "save_pretrained"):
            raise TypeError(f"weight sync saves with save_pretrained; {type(model).__name__} has none")
        start = time.perf_counter()
        self._weight_version += 1
        path = self.weights_dir / "policy"
        model.save_pretrained(
            path, safe_serialization=True, state_dict=cast_floats(model.state_dict(), self.sync_dtype)
        )
        body = {"model_path": str(path), "weight_version": str(self._weight_version)}
        self._on_every_server("/update_weights_from_disk", dict.fromkeys(self._servers(), body),
                              f"load the weights in {path}")  # fmt: skip
        # /update_weights_from_disk flushes the radix cache itself.
        self.stats.weight_sync_seconds += time.perf_counter() - start

"""Span attribute names: the OpenTelemetry GenAI semantic conventions we follow, and our own.

We follow the GenAI semantic conventions as of semconv 1.37.0 (the release that introduced
``gen_ai.provider.name``). Names are spelled out here rather than imported from the
incubating semconv package, whose module layout changes between releases.
"""

from __future__ import annotations

SEMCONV_VERSION = "1.37.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"

# GenAI semantic conventions (in-process model calls use span kind INTERNAL).
OPERATION_NAME = "gen_ai.operation.name"
PROVIDER_NAME = "gen_ai.provider.name"
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
REQUEST_TEMPERATURE = "gen_ai.request.temperature"
REQUEST_TOP_P = "gen_ai.request.top_p"
REQUEST_TOP_K = "gen_ai.request.top_k"
REQUEST_SEED = "gen_ai.request.seed"
USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
TEXT_COMPLETION = "text_completion"
CHAT = "chat"  # the operation of a request with messages; its span keeps the name text_completion, as tables find it
PROVIDER = "transformers"

# OpenInference semantic conventions (openinference-semantic-conventions 0.1.x), so Phoenix reads
# exported traces natively, whether or not it translates gen_ai.* (Phoenix 20 does, 15.9 does not).
SPAN_KIND = "openinference.span.kind"
KIND_CHAIN = "CHAIN"  # a run, a hop of an LLM call, and the engine's loads, evictions and probes
KIND_LLM = "LLM"  # a request to a model, and the batch that served it
KIND_TOOL = "TOOL"  # a Python hop
INPUT_VALUE = "input.value"
INPUT_MIME_TYPE = "input.mime_type"
OUTPUT_VALUE = "output.value"
OUTPUT_MIME_TYPE = "output.mime_type"
MIME_TEXT = "text/plain"
MIME_JSON = "application/json"
LLM_MODEL_NAME = "llm.model_name"
LLM_PROVIDER = "llm.provider"
LLM_SYSTEM = "llm.system"
LLM_INVOCATION_PARAMETERS = "llm.invocation_parameters"
LLM_INPUT_MESSAGES = "llm.input_messages"  # flattened: llm.input_messages.0.message.role, ...content
LLM_TOKEN_COUNT_PROMPT = "llm.token_count.prompt"
LLM_TOKEN_COUNT_COMPLETION = "llm.token_count.completion"
LLM_TOKEN_COUNT_TOTAL = "llm.token_count.total"
TOOL_NAME = "tool.name"
OI_SESSION_ID = "session.id"
PROJECT_NAME = "openinference.project.name"  # a resource attribute: the Phoenix project spans land in
# OpenInference names only hosted providers (openai, azure, ...); a model in this process has none of them.
LOCAL_PROVIDER = "local"

# Workbench-specific attributes.
RUN_ID = "workbench.run.id"
CHAIN_NAME = "workbench.chain.name"
SESSION_ID = "workbench.session.id"
HOP_NAME = "workbench.hop.name"
HOP_KIND = "workbench.hop.kind"
MODEL_NAME = "workbench.model.name"
MODEL_SOURCE = "workbench.model.source"
MODEL_DEVICE = "workbench.model.device"
MODEL_DTYPE = "workbench.model.dtype"
MODEL_PARAMS = "workbench.model.params"
MODEL_MEMORY_BYTES = "workbench.model.memory_bytes"
MODEL_ADAPTER = "workbench.model.adapter"
MODEL_ISOLATION = "workbench.model.isolation"  # thread (in this process) or process (a child of its own)
PROCESS_PID = "workbench.process.pid"  # the process a model runs in, when that is a child process
# True on a span recorded in another process (a model process's prefill and decode) and re-created here: this
# process's garbage-collector pauses did not stop it, so the trace table gives it no gc_ms.
RECORDED_ELSEWHERE = "workbench.span.recorded_elsewhere"
PROCESS_RESTARTS = "workbench.process.restarts"  # how often that child process was started again after dying
PROCESS_PREVIOUS_PID = "workbench.process.previous_pid"  # on a restart span: the child process that died
IPC_MS = "workbench.ipc_ms"  # a batch's round trip to the model process, less the time the child spent on it
QUEUE_MS = "workbench.queue_ms"
TOKENIZE_MS = "workbench.tokenize_ms"
# True: the prompt went to a server without being tokenized here (it surely fit the window; the server counted it).
PROMPT_UNCOUNTED = "workbench.prompt_uncounted"
PREFILL_MS = "workbench.prefill_ms"
TTFT_MS = "workbench.ttft_ms"
DECODE_MS = "workbench.decode_ms"
DETOKENIZE_MS = "workbench.detokenize_ms"
# A batch span's decoding loop: "generate" (transformers') or "workbench" (a lone greedy row, see backends/transformers.py).
DECODE_LOOP = "workbench.decode_loop"
TRUNCATED_TOKENS = "workbench.truncated_tokens"
BATCH_ID = "workbench.batch.id"
BATCH_SIZE = "workbench.batch.size"
BATCH_POLICY = "workbench.batch.policy"
PADDING_TOKENS = "workbench.batch.padding_tokens"
# Replicas: which replica of its model served a request (``m#1``), and the set's balance policy.
REPLICA = "workbench.replica"
BALANCE_POLICY = "workbench.balance.policy"
# Ray replicas (engine="ray"): the node and actor that ran a request, and what the actor call cost on top of
# the batch's own work (the round trip, Ray's serialization, the actor's queue).
RAY_NODE = "workbench.ray.node_id"
RAY_ACTOR = "workbench.ray.actor_id"
RAY_ACTOR_MS = "workbench.ray.actor_ms"
RAY_OVERHEAD_MS = "workbench.ray.overhead_ms"
RAY_RESTARTS = "workbench.ray.restarts"  # how often the replica's actor was started again after dying
RAY_PREVIOUS_NODE = "workbench.ray.previous_node_id"  # on a restart span: the node the actor that died ran on

# Live configuration: the version of the chain's configuration a run used (a counter) and its content hash.
CONFIG_VERSION = "workbench.config.version"
CONFIG_HASH = "workbench.config.hash"

# Resilience: attempts, the path that served a hop, breakers, health probes, injected faults.
ATTEMPT = "workbench.attempt"
ATTEMPTS = "workbench.attempts"
ROUTE = "workbench.route"
SERVED_BY = "workbench.served_by"
FALLBACK = "workbench.fallback"
ERROR_KIND = "workbench.error.kind"
BREAKER_STATE = "workbench.breaker.state"
PROBE = "workbench.probe"
OOM_SPLIT = "workbench.batch.oom_split"
FAULT_ERROR = "workbench.fault.error"
FAULT_LATENCY_MS = "workbench.fault.latency_ms"
FAULT_OOM = "workbench.fault.oom"

# Loading and preloading (load, evict and prepare spans).
LOAD_S = "workbench.load_s"
WARMUP_S = "workbench.warmup_s"
COLD_START_S = "workbench.cold_start_s"
LOAD_TRIGGER = "workbench.load.trigger"
PRELOADING = "workbench.preloading"
BUDGET_BYTES = "workbench.keep_warm.budget_bytes"
EVICTED_FOR = "workbench.keep_warm.evicted_for"
CANCELLED = "workbench.cancelled"

# A model behind an OpenAI-compatible server, measured on the client as vLLM's serving benchmark does:
# the clock starts just before the POST, TTFT at the first chunk that carries a choice, one inter-token
# latency per later chunk that carries text. The request span's ttft_ms and decode_ms also count the
# queue; these do not.
HTTP_STATUS = "http.response.status_code"  # OpenTelemetry's HTTP semantic conventions
SERVER_ADDRESS = "server.address"
REMOTE_URL = "workbench.remote.url"
REMOTE_SERVED_MODEL = "workbench.remote.served_model"
REMOTE_ENDPOINT = "workbench.remote.endpoint"
REMOTE_TTFT_MS = "workbench.remote.ttft_ms"
REMOTE_E2E_MS = "workbench.remote.e2e_ms"
REMOTE_TPOT_MS = "workbench.remote.tpot_ms"
REMOTE_ITL_MS = "workbench.remote.itl_ms"  # a list: one per chunk after the first
REMOTE_CHUNKS = "workbench.remote.chunks"
# Who counted the tokens: "server" (its usage), "tokenizer" (the model's, here), or "chunks" (one per chunk).
REMOTE_TOKENS_FROM = "workbench.remote.tokens_from"
REMOTE_FAILURE = "workbench.remote.failure"  # the kind of a RemoteError
REMOTE_RETRY_AFTER_S = "workbench.remote.retry_after_s"

# Batch spans beyond size and policy; events of breakers, health, retries and fallbacks.
BATCH_PADDED_LEN = "workbench.batch.padded_len"
BATCH_STEPS = "workbench.batch.steps"
BATCH_HALVES = "workbench.batch.halves"
BATCH_LIMIT = "workbench.batch.limit"
BATCH_MODE = "workbench.batch.mode"
BATCH_INFLIGHT = "workbench.batch.inflight"
FAULT_KIND = "workbench.fault.kind"
HEALTH = "workbench.health"
HEALTH_PREVIOUS = "workbench.health.previous"
BREAKER_PREVIOUS = "workbench.breaker.previous"
BREAKER_FAILURES = "workbench.breaker.failures"
BREAKER_LAST_ERROR = "workbench.breaker.last_error"
RETRY_WAIT_MS = "workbench.retry.wait_ms"
FALLBACK_REASON = "workbench.fallback.reason"

# Knowledge hops (kind: knowledge): the graph asked, what linking and the walk took and found, and what the
# facts add to the next prompt (characters always; tokens when the next LLM hop's tokenizer is on this machine).
KIND_RETRIEVER = "RETRIEVER"  # OpenInference's span kind for a lookup that feeds a prompt
KNOWLEDGE_GRAPH = "workbench.knowledge.graph"
KNOWLEDGE_HOPS = "workbench.knowledge.hops"
KNOWLEDGE_MAX_TRIPLES = "workbench.knowledge.max_triples"
KNOWLEDGE_LOAD_MS = "workbench.knowledge.load_ms"  # only on the hop that loaded the graph (its first use)
KNOWLEDGE_LINK_MS = "workbench.knowledge.link_ms"
KNOWLEDGE_TRAVERSE_MS = "workbench.knowledge.traverse_ms"
KNOWLEDGE_ENTITIES = "workbench.knowledge.entities"  # a list: the graph's names for what the query mentioned
KNOWLEDGE_TRIPLES = "workbench.knowledge.triples"  # how many facts the hop returned
KNOWLEDGE_TRUNCATED = "workbench.knowledge.truncated"  # the walk stopped at max_triples with more to find
KNOWLEDGE_PROMPT_CHARS = "workbench.knowledge.prompt_chars"
KNOWLEDGE_PROMPT_TOKENS = "workbench.knowledge.prompt_tokens"
KNOWLEDGE_TOKENIZER = "workbench.knowledge.tokenizer"  # the model whose tokenizer counted prompt_tokens
KNOWLEDGE_INLINE = "workbench.knowledge.inline"  # looked up on the event loop (true) or in the hop pool
# The graph's file changed but could not be read again: the hop used the last version that loaded, and says why.
KNOWLEDGE_STALE = "workbench.knowledge.stale"
KNOWLEDGE_RELOAD_ERROR = "workbench.knowledge.reload_error"

# Caches (the hop's ``cache:``) and prefetch: the exact response cache's lookup on the hop span, the prefix
# (KV) cache's reuse on the request span (and copied to the hop span), and whether a map prepared the hop ahead.
CACHE_MODE = "workbench.cache.mode"  # off, exact, prefix, exact+prefix
CACHE_HIT = "workbench.cache.hit"  # the exact cache answered (the engine was not called)
CACHE_KEY = "workbench.cache.key"
CACHE_SAVED_MS = "workbench.cache.saved_ms"  # on a hit: what the stored answer cost the model when it made it
CACHE_TOKENS_OUT = "workbench.cache.tokens_out"  # on a hit: the stored answer's output tokens, as the model wrote it
CACHE_SHARED = "workbench.cache.shared"  # the hit was the answer of the same call another run was making
PREFIX_TOKENS = "workbench.cache.prefix_tokens"  # prompt tokens whose KV was reused, not prefilled
PREFIX_SAVED_MS = "workbench.cache.prefix_ttft_saved_ms"  # estimate: the prefix's own prefill, measured once
PREFETCHED = "workbench.prefetch.prepared"  # a map prepared this hop (rendered, tokenized, prefix warmed) ahead

# Named LoRA adapters (adapters=, a hop's adapter:) and their live swaps (bench.watch_adapter).
ADAPTER_NAME = "workbench.adapter.name"  # on a request: the adapter it ran with (absent: the base model)
ADAPTER_VERSION = "workbench.adapter.version"  # ... and its version (1, 2, ...)
ADAPTER_KEY = "workbench.adapter.key"  # ... as the peft model names it: sql@v2
ADAPTER_NAMES = "workbench.adapter.names"  # a load's adapters; a batch's keys (__base__ for the base model)
ADAPTER_BATCHING = "workbench.batch.adapters"  # mixed (one generate, adapter_names per row) or grouped
ADAPTER_PATH = "workbench.adapter.path"
ADAPTER_DIGEST = "workbench.adapter.digest"
ADAPTER_STATE = "workbench.adapter.state"  # what staging a version ended in: live or refused
ADAPTER_SWAP_MS = "workbench.adapter.swap_ms"
ADAPTER_ERROR = "workbench.adapter.error"

"""Drive the gateway's /v1/chat/completions and /v1/embeddings with the official `openai` package.

Usage: python3 openai_client.py BASE_URL   (BASE_URL like http://127.0.0.1:PORT/v1)
Exits non-zero with a message on any mismatch; prints OK on success.
"""
import json
import sys

try:
    import openai
except ImportError:
    sys.exit("the `openai` package is missing: pip install openai")

base_url = sys.argv[1]
client = openai.OpenAI(
    base_url=base_url,
    api_key="not-needed-for-the-demo",
    default_headers={"x-llmscope-tenant-id": "acme-corp", "x-llmscope-feature-id": "chat"},
    max_retries=0,
)

# Allowed: a tier name as the model.
resp = client.chat.completions.create(model="cheap", messages=[{"role": "user", "content": "Say hello"}], max_tokens=50)
assert resp.choices[0].message.content.startswith("[mock gpt-4o-mini]"), resp
assert resp.model == "gpt-4o-mini", resp.model
assert resp.usage.completion_tokens == 50, resp.usage
assert resp.choices[0].finish_reason == "length", resp.choices[0].finish_reason

# Allowed: a model name of the route, with attribution in the request too.
raw = client.chat.completions.with_raw_response.create(
    model="gpt-4o", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
)
assert raw.headers["x-llmscope-model-tier"] == "expensive", dict(raw.headers)
assert raw.headers["x-llmscope-policy-decision"] == "allow", dict(raw.headers)
assert raw.parse().model == "gpt-4o"

# Denied by policy: the client sees a 402 in OpenAI's error shape.
try:
    client.chat.completions.create(
        model="cheap", messages=[{"role": "user", "content": "too expensive"}],
        extra_headers={"x-llmscope-budget-namespace": "tight"},
    )
    sys.exit("expected a 402")
except openai.APIStatusError as e:
    assert e.status_code == 402, e.status_code
    body = e.response.json()["error"]
    assert body["code"] == "policy_denied", body
    assert body["policy_id"] == "tight-cap", body
    assert "Tight budget exceeded" in body["message"], body

# Unknown model: a 422 naming the parameter.
try:
    client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    sys.exit("expected a 422")
except openai.APIStatusError as e:
    assert e.status_code == 422, e.status_code
    assert e.response.json()["error"]["param"] == "model"

# Tools: the answer calls one; n=2: two choices, billed for both.
tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
resp = client.chat.completions.create(
    model="cheap", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools, n=2, max_tokens=30,
)
assert len(resp.choices) == 2, resp
call = resp.choices[0].message.tool_calls[0]
assert call.function.name == "get_weather" and resp.choices[0].finish_reason == "tool_calls", resp
assert resp.usage.completion_tokens == 60, resp.usage
# The tool's result sent back, with the call that asked for it.
resp = client.chat.completions.create(
    model="cheap", tools=tools, tool_choice="none", messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ],
)
assert resp.choices[0].message.content.startswith("[mock gpt-4o-mini]"), resp

# JSON mode: the answer is a JSON object.
resp = client.chat.completions.create(
    model="cheap", messages=[{"role": "user", "content": "Answer in JSON"}], response_format={"type": "json_object"},
)
assert isinstance(json.loads(resp.choices[0].message.content), dict), resp

# A parameter the gateway would neither price nor send: a 422 naming it, never dropped.
try:
    client.chat.completions.create(
        model="cheap", messages=[{"role": "user", "content": "x"}], service_tier="priority",
    )
    sys.exit("expected a 422")
except openai.APIStatusError as e:
    assert e.status_code == 422, e.status_code
    assert e.response.json()["error"]["param"] == "service_tier"

# The models a body may name: the route's tiers and models.
ids = [m.id for m in client.models.list()]
assert ids[:2] == ["cheap", "expensive"] and "gpt-4o-mini" in ids, ids

# Streamed: chunks as they come, the usage chunk only when asked for.
chunks = list(client.chat.completions.create(
    model="cheap", messages=[{"role": "user", "content": "Stream hello"}], stream=True,
))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text.startswith("[mock gpt-4o-mini]"), text
assert chunks[-1].choices[0].finish_reason == "stop", chunks[-1]
assert all(c.usage is None for c in chunks), chunks
chunks = list(client.chat.completions.create(
    model="cheap", messages=[{"role": "user", "content": "Stream hello"}], stream=True,
    stream_options={"include_usage": True}, max_tokens=40,
))
assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40, chunks[-1]

# Streamed tool call: the call's name, then its arguments, in delta.tool_calls.
chunks = list(client.chat.completions.create(
    model="cheap", messages=[{"role": "user", "content": "Weather?"}], tools=tools, stream=True,
))
calls = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
assert calls and calls[0].function.name == "get_weather", chunks
assert "".join(t.function.arguments or "" for t in calls) == "{}", calls
assert chunks[-1].choices[0].finish_reason == "tool_calls", chunks[-1]
# Embeddings: the client asks for base64 by default and decodes it; priced at the input tokens.
emb = client.embeddings.create(model="cheap", input=["Embed this", "and this"])
assert [len(d.embedding) for d in emb.data] == [8, 8], emb
assert [d.index for d in emb.data] == [0, 1], emb
assert emb.model == "gpt-4o-mini", emb.model
assert emb.usage.prompt_tokens == emb.usage.total_tokens > 0, emb.usage
floats = client.embeddings.create(model="cheap", input="Embed this", encoding_format="float")
# The same vector either way (JSON prints the f32 shortest, base64 carries its exact bits).
pairs = list(zip(floats.data[0].embedding, emb.data[0].embedding))
assert len(pairs) == 8 and all(abs(a - b) < 1e-6 for a, b in pairs), pairs
try:
    client.embeddings.create(model="cheap", input="x", extra_body={"tools": []})
    sys.exit("expected a 422")
except openai.APIStatusError as e:
    assert e.status_code == 422, e.status_code
    assert e.response.json()["error"]["param"] == "tools"

print("OK")

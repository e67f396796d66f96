"""weir plugin SDK for Python: the same shape as the Rust SDK (``weir-sdk``).

A plugin is a function decorated with ``@consumer`` that takes one record and a context::

    import weir_plugin as weir

    @weir.consumer
    def credit_points(record: weir.Record, ctx: weir.Context) -> None:
        paid = record.json()
        balance = (ctx.get(f"balance/{paid['user']}") or 0) + int(paid["amount"])
        ctx.put(f"balance/{paid['user']}", balance)
        ctx.emit_json("points.credited", paid["user"], {"user": paid["user"], "balance": balance})

    WitWorld = weir.WitWorld  # what componentize-py exports

Batches arrive and outputs leave as one blob each in the weir batch encoding
(docs/batch-encoding.md); this module decodes and encodes it, so the plugin only sees records.
State values are JSON (``get``/``put``) or bytes (``get_bytes``/``put_bytes``), each with a
version for ``compare_and_set``. A raised exception fails the batch; its message, prefixed
with the record's offset, reaches the operator and the dead-letter topic, as in Rust.

Plugin logic is tested natively with ``MemoryState`` (no wasm, no server)::

    state = weir.MemoryState()
    outputs = weir.run(credit_points, [weir.Record(value=b'{"user":"a","amount":3}')], state)
"""

import json
import struct

__all__ = [
    "Record",
    "Output",
    "Context",
    "MemoryState",
    "PluginError",
    "consumer",
    "run",
    "decode_batch",
    "encode_outputs",
    "WitWorld",
]


class PluginError(Exception):
    """Fails the batch with a message for the operator."""


class Record:
    """One input record."""

    __slots__ = ("offset", "timestamp_ms", "partition", "key", "value", "id", "headers")

    def __init__(self, value=b"", key=None, offset=0, timestamp_ms=0, partition=0, id=None, headers=()):
        self.offset = offset
        self.timestamp_ms = timestamp_ms
        self.partition = partition
        self.key = key
        self.value = value
        self.id = id
        self.headers = list(headers)

    def json(self):
        """The value parsed as JSON."""
        try:
            return _json_value(self.value)
        except ValueError as e:
            raise PluginError(f"value is not the expected JSON: {e}") from None

    def text(self):
        """The value as UTF-8 text."""
        try:
            return self.value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PluginError(f"value is not UTF-8: {e}") from None

    def key_str(self):
        """The key as UTF-8 text, if any."""
        return None if self.key is None else self.key.decode("utf-8")

    def header(self, name):
        """The first header value with this name, if any."""
        for k, v in self.headers:
            if k == name:
                return v
        return None


class Output:
    """One record the plugin emits."""

    __slots__ = ("topic", "key", "value", "headers")

    def __init__(self, topic, key, value, headers=()):
        self.topic = topic
        self.key = key
        self.value = value
        self.headers = list(headers)

    def json(self):
        return _json_value(self.value)


def _bytes(v):
    if v is None:
        return None
    if isinstance(v, str):
        return v.encode("utf-8")
    return bytes(v)


# Compact, insertion-ordered: for plain data the bytes serde_json writes for the same fields.
# One encoder and decoder for the module: json.dumps with options builds an encoder per call,
# and json.loads of bytes sniffs the encoding first; together half the points plugin's time.
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_DECODE = json.JSONDecoder().decode


def _json_bytes(obj):
    return _ENCODE(obj).encode("utf-8")


def _json_value(raw):
    return _DECODE(raw.decode("utf-8"))


class MemoryState:
    """State for native tests: key → (value, version)."""

    def __init__(self):
        self.entries = {}
        self.logs = []

    def get(self, key):
        return self.entries.get(bytes(key))

    def put(self, key, value):
        _, version = self.entries.get(bytes(key), (None, 0))
        self.entries[bytes(key)] = (bytes(value), version + 1)

    def delete(self, key):
        self.entries.pop(bytes(key), None)

    def compare_and_set(self, key, expected, value):
        _, version = self.entries.get(bytes(key), (None, 0))
        if version != expected:
            return None
        self.entries[bytes(key)] = (bytes(value), version + 1)
        return version + 1

    def log(self, level, message):
        self.logs.append((level, message))

    def get_json(self, key):
        entry = self.get(_bytes(key))
        return None if entry is None else _json_value(entry[0])


class _HostState:
    """The plugin world's `state` and `log` imports (only inside a component)."""

    def __init__(self):
        from wit_world.imports import log, state

        self._state = state
        self._log = log

    def get(self, key):
        v = self._state.get(key)
        return None if v is None else (v.value, v.version)

    def put(self, key, value):
        self._state.put(key, value)

    def delete(self, key):
        self._state.delete(key)

    def compare_and_set(self, key, expected, value):
        return self._state.compare_and_set(key, expected, value)

    def log(self, level, message):
        levels = {
            "debug": self._log.Level.DEBUG,
            "info": self._log.Level.INFO,
            "warn": self._log.Level.WARN,
            "error": self._log.Level.ERROR,
        }
        self._log.write(levels[level], message)


class Context:
    """What a plugin may do while processing a record: state, config, emit, log."""

    def __init__(self, state, config=None):
        self._state = state
        self.config = dict(config or {})
        self.outputs = []

    def config_or(self, name, default):
        """A config value converted to the default's type, or the default."""
        raw = self.config.get(name)
        if raw is None:
            return default
        try:
            return type(default)(raw)
        except ValueError:
            raise PluginError(f"config {name}={raw!r} is not a {type(default).__name__}") from None

    def get_versioned(self, key):
        """(bytes, version) or None."""
        return self._state.get(_bytes(key))

    def get_bytes(self, key):
        entry = self._state.get(_bytes(key))
        return None if entry is None else entry[0]

    def get(self, key):
        """The JSON value of a key, or None."""
        raw = self.get_bytes(key)
        return None if raw is None else _json_value(raw)

    def put_bytes(self, key, value):
        self._state.put(_bytes(key), _bytes(value))

    def put(self, key, value):
        """Stores a JSON value."""
        self.put_bytes(key, _json_bytes(value))

    def delete(self, key):
        self._state.delete(_bytes(key))

    def compare_and_set(self, key, expected_version, value):
        """Writes the JSON value if the key's version is `expected_version` (0 = absent);
        the new version, or None when it did not match."""
        return self._state.compare_and_set(_bytes(key), expected_version, _json_bytes(value))

    def emit(self, topic, key, value, headers=()):
        """Emits a record to one of the plugin's output topics."""
        self.outputs.append(Output(topic, _bytes(key), _bytes(value), [(k, _bytes(v)) for k, v in headers]))

    def emit_json(self, topic, key, obj):
        self.emit(topic, key, _json_bytes(obj))

    def log(self, message, level="info"):
        """A line in `weir plugin logs`."""
        self._state.log(level, str(message))


# --- the batch encoding (docs/batch-encoding.md) -------------------------------------------


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_HEAD = struct.Struct("<QqIB")  # offset, timestamp_ms, partition, flags


def decode_batch(blob):
    """The records of an input batch blob."""
    b = bytes(blob)
    end = len(b)
    u16, u32, head = _U16.unpack_from, _U32.unpack_from, _HEAD.unpack_from
    out = []
    try:
        (count,) = u32(b, 0)
        i = 4
        for _ in range(count):
            offset, timestamp_ms, partition, flags = head(b, i)
            i += 21
            key = None
            if flags & 1:
                (n,) = u32(b, i)
                key = b[i + 4 : i + 4 + n]
                i += 4 + n
            (n,) = u32(b, i)
            value = b[i + 4 : i + 4 + n]
            i += 4 + n
            rid = None
            if flags & 2:
                (n,) = u16(b, i)
                rid = b[i + 2 : i + 2 + n].decode("utf-8")
                i += 2 + n
            (nh,) = u16(b, i)
            i += 2
            headers = []
            for _ in range(nh):
                (n,) = u16(b, i)
                name = b[i + 2 : i + 2 + n].decode("utf-8")
                i += 2 + n
                (n,) = u32(b, i)
                headers.append((name, b[i + 4 : i + 4 + n]))
                i += 4 + n
            if i > end:
                raise PluginError("batch blob truncated")
            out.append(Record(value, key, offset, timestamp_ms, partition, rid, headers))
    except struct.error:
        raise PluginError("batch blob truncated") from None
    if i != end:
        raise PluginError("batch blob has trailing bytes")
    return out


def encode_outputs(outputs):
    """The outputs blob of a list of `Output`."""
    u16, u32 = _U16.pack, _U32.pack
    parts = [u32(len(outputs))]
    add = parts.append
    for o in outputs:
        topic = o.topic.encode("utf-8")
        key = o.key
        add(u16(len(topic)))
        add(topic)
        add(b"\x00" if key is None else b"\x01" + u32(len(key)) + key)
        add(u32(len(o.value)))
        add(o.value)
        add(u16(len(o.headers)))
        for k, v in o.headers:
            kb = k.encode("utf-8")
            add(u16(len(kb)) + kb + u32(len(v)) + v)
    return b"".join(parts)


# --- wiring --------------------------------------------------------------------------------

_handler = None


def consumer(fn):
    """Marks the plugin's per-record function."""
    global _handler
    _handler = fn
    return fn


def run(fn, records, state, config=None):
    """Runs `fn` over records natively (tests); returns the outputs."""
    ctx = Context(state, config)
    for record in records:
        fn(record, ctx)
    return ctx.outputs


class WitWorld:
    """The exports of the `weir:plugin/consumer` world, for componentize-py."""

    _config = {}

    def configure(self, config):
        WitWorld._config = dict(config)

    def process(self, batch):
        from componentize_py_types import Err

        if _handler is None:
            raise Err("no @weir_plugin.consumer function was defined")
        ctx = Context(_HostState(), WitWorld._config)
        for record in decode_batch(batch):
            try:
                _handler(record, ctx)
            except Exception as e:  # noqa: BLE001 - every failure fails the batch, by design
                raise Err(f"offset={record.offset}: {type(e).__name__}: {e}") from None
        return encode_outputs(ctx.outputs)

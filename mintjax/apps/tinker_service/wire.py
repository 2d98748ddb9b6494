"""The protobuf payloads of the Tinker API, read and written by hand.

Owns a minimal protocol-buffers wire codec (varints, length-delimited and
fixed-width fields; enough for the messages below) and the three messages
the SDK exchanges as `application/x-protobuf`:

  ForwardBackwardRequest   (request body of /api/v1/forward_backward)
  ForwardBackwardOutput    (a forward_backward future's result)
  SampleResponse           (an asample future's result)

Field numbers are the protocol's (learned from the SDK's message
descriptors); the code is ours and needs no protobuf runtime. Decoded
requests become plain Python (`Datum` dicts of numpy arrays); anything the
service does not support (image/audio chunks, sparse tensors) is refused with
a `WireError` that says so.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Iterator, Mapping, Sequence

import numpy as np

# DType enum of the protocol.
DTYPE_FLOAT32, DTYPE_INT64, DTYPE_INT32 = 1, 2, 3
_NP_OF_DTYPE = {DTYPE_FLOAT32: np.float32, DTYPE_INT64: np.int64,
                DTYPE_INT32: np.int32}
STOP_REASONS = {"stop": 0, "length": 1}


class WireError(ValueError):
  """A payload that is not a message this service understands."""


# --- decoding --------------------------------------------------------------

def _varint(buf: bytes, i: int) -> tuple[int, int]:
  shift = result = 0
  while True:
    if i >= len(buf):
      raise WireError("truncated varint in protobuf payload")
    byte = buf[i]
    i += 1
    result |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return result, i
    shift += 7
    if shift > 70:
      raise WireError("varint longer than 10 bytes in protobuf payload")


def fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
  """Yields (field number, wire type, value) of one message's fields.

  Values: int for varints and fixed-width fields (raw bits), bytes for
  length-delimited ones.
  """
  i, n = 0, len(buf)
  while i < n:
    key, i = _varint(buf, i)
    num, wt = key >> 3, key & 7
    if wt == 0:
      val, i = _varint(buf, i)
    elif wt == 1:
      val, i = int.from_bytes(buf[i:i + 8], "little"), i + 8
    elif wt == 2:
      size, i = _varint(buf, i)
      if i + size > n:
        raise WireError("length-delimited field runs past the payload end")
      val, i = bytes(buf[i:i + size]), i + size
    elif wt == 5:
      val, i = int.from_bytes(buf[i:i + 4], "little"), i + 4
    else:
      raise WireError(f"unsupported protobuf wire type {wt} (field {num})")
    yield num, wt, val


def _packed_varints(val, wt) -> list[int]:
  if wt == 0:
    return [val]
  out, i = [], 0
  while i < len(val):
    v, i = _varint(val, i)
    out.append(v)
  return out


def _map_entry(buf: bytes) -> tuple[str, object, int]:
  key, value, wt_v = "", b"", 2
  for num, wt, val in fields(buf):
    if num == 1:
      key = val.decode("utf-8")
    elif num == 2:
      value, wt_v = val, wt
  return key, value, wt_v


def _double(bits: int) -> float:
  return struct.unpack("<d", bits.to_bytes(8, "little"))[0]


def decode_tensor(buf: bytes, name: str) -> np.ndarray:
  """A `Tensor` message -> numpy array (dense only)."""
  dense, dtype, shape, sparse = None, 0, [], False
  for num, wt, val in fields(buf):
    if num == 1:
      dense = val
    elif num == 2:
      sparse = True
    elif num == 3:
      dtype = val
    elif num == 4:
      shape += [v - (1 << 64) if v >= 1 << 63 else v
                for v in _packed_varints(val, wt)]
  if sparse:
    raise WireError(f"loss_fn_inputs[{name!r}] is a sparse tensor; this "
                    "service takes dense 1-D per-token tensors")
  if dtype not in _NP_OF_DTYPE:
    raise WireError(f"loss_fn_inputs[{name!r}] has unsupported dtype code "
                    f"{dtype}; send float32 or int64")
  arr = np.frombuffer(dense or b"", _NP_OF_DTYPE[dtype])
  return arr.reshape(shape) if shape else arr


@dataclasses.dataclass
class Datum:
  """One decoded training example: input tokens [T] and per-token inputs."""

  tokens: np.ndarray
  inputs: dict[str, np.ndarray]


def _decode_datum(buf: bytes) -> Datum:
  tokens, inputs = [], {}
  for num, _, val in fields(buf):
    if num == 1:  # Chunk
      for cnum, _, cval in fields(val):
        if cnum != 1:
          raise WireError("only encoded_text model_input chunks are "
                          "supported (no image or audio chunks)")
        for tnum, _, tval in fields(cval):
          if tnum == 1:
            tokens.append(np.frombuffer(tval, np.int32))
    elif num == 2:
      key, value, _ = _map_entry(val)
      inputs[key] = decode_tensor(value, key)
  return Datum(np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
               inputs)


@dataclasses.dataclass
class ForwardBackwardRequest:
  model_id: str
  seq_id: int
  data: list[Datum]
  loss_fn: str
  loss_fn_config: dict[str, float]
  forward_only: bool


def decode_forward_backward(buf: bytes) -> ForwardBackwardRequest:
  """Parses a ForwardBackwardRequest body."""
  req = ForwardBackwardRequest("", 0, [], "", {}, False)
  for num, wt, val in fields(buf):
    if num == 1:
      req.model_id = val.decode("utf-8")
    elif num == 2:
      req.seq_id = val if val < 1 << 31 else val - (1 << 64)
    elif num == 3:
      req.data.append(_decode_datum(val))
    elif num == 4:
      req.loss_fn = val.decode("utf-8")
    elif num == 5:
      key, value, wt_v = _map_entry(val)
      req.loss_fn_config[key] = _double(value) if wt_v == 1 else 0.0
    elif num == 6:
      req.forward_only = bool(val)
    elif num == 7:  # LossConfigValue: number (1) or text (2)
      key, value, _ = _map_entry(val)
      for vnum, vwt, vval in fields(value):
        if vnum == 1 and vwt == 1:
          req.loss_fn_config[key] = _double(vval)
        elif vnum == 2:
          raise WireError(f"loss_fn_config[{key!r}] is text; this service "
                          "takes numbers only")
    del wt
  return req


# --- encoding --------------------------------------------------------------

def _enc_varint(v: int) -> bytes:
  if v < 0:
    v += 1 << 64
  out = bytearray()
  while True:
    byte = v & 0x7F
    v >>= 7
    if v:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _key(num: int, wt: int) -> bytes:
  return _enc_varint(num << 3 | wt)


def _bytes_field(num: int, data: bytes) -> bytes:
  return _key(num, 2) + _enc_varint(len(data)) + data


def _varint_field(num: int, v: int) -> bytes:
  return _key(num, 0) + _enc_varint(v) if v else b""


def _double_field(num: int, v: float) -> bytes:
  return _key(num, 1) + struct.pack("<d", v)


def _packed(num: int, values: Sequence[int]) -> bytes:
  if not values:
    return b""
  return _bytes_field(num, b"".join(_enc_varint(int(v)) for v in values))


def _batched_tensor(arrays: Sequence[np.ndarray], dtype: int) -> bytes:
  np_dtype = _NP_OF_DTYPE[dtype]
  parts = [np.ascontiguousarray(a, np_dtype).tobytes() for a in arrays]
  offsets = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
  return (_bytes_field(1, b"".join(parts)) +
          _bytes_field(2, offsets.tobytes()) + _varint_field(3, dtype))


def encode_forward_backward_output(
    outputs: Mapping[str, Sequence[np.ndarray]], num_datums: int,
    metrics: Mapping[str, float]) -> bytes:
  """A ForwardBackwardOutput with one ArrayRecord of float32 fields.

  Args:
    outputs: field name -> one 1-D array per datum (e.g. 'logprobs').
    num_datums: datums in the request.
    metrics: e.g. {'loss:sum': ...}.
  """
  record = _bytes_field(1, b"ArrayRecord") + _varint_field(3, num_datums)
  for name, arrays in outputs.items():
    entry = _bytes_field(1, name.encode()) + _bytes_field(
        2, _batched_tensor(arrays, DTYPE_FLOAT32))
    record += _bytes_field(2, entry)
  out = _bytes_field(1, b"ArrayRecord") + _bytes_field(2, record)
  for k, v in metrics.items():
    out += _bytes_field(3, _bytes_field(1, k.encode()) +
                        _double_field(2, float(v)))
  return out


def encode_sample_response(sequences: Sequence[tuple[str, np.ndarray,
                                                     np.ndarray]],
                           prompt_logprobs: np.ndarray | None = None
                           ) -> bytes:
  """A SampleResponse.

  Args:
    sequences: (stop reason 'stop' | 'length', tokens [N] int, logprobs [N]
      float) per sample.
    prompt_logprobs: optional [P] float32, NaN where there is none (the
      first prompt token).
  """
  out = b""
  for reason, tokens, logprobs in sequences:
    seq = (_varint_field(1, STOP_REASONS[reason]) +
           _bytes_field(2, np.asarray(tokens, np.int32).tobytes()) +
           _bytes_field(3, np.asarray(logprobs, np.float32).tobytes()))
    out += _bytes_field(1, seq)
  if prompt_logprobs is not None:
    out += _bytes_field(2, np.asarray(prompt_logprobs, np.float32).tobytes())
  return out

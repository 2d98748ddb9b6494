"""A Tinker-compatible training and sampling service (docs/TINKER.md).

The official `tinker` SDK trains and samples per-user LoRA adapters on a
local mintjax: `app` (HTTP routes), `wire` (protobuf payloads), `trainer`
(tenants in bank slots, requests of many clients batched into one compiled
step), `sampler` (sampling sessions over the Engine) and `server` (building
and running it). Heavy imports (fastapi, uvicorn) stay inside the modules.
"""

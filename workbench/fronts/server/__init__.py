"""The gateway: served chains over REST + SSE, JSON-RPC, OpenAI-compatible routes and gRPC, behind auth."""

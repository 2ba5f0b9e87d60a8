"""The KSI MCP face: Claude turns reach the daemon as MCP tools (``mcp__ksi__<tool>``).

Why it is built this way (LITELLM_INTEGRATION.md, "The KSI MCP face", has the user's view):

* **Served by the daemon, over streamable HTTP on 127.0.0.1.** A stdio server would be one
  more Python process per CLI start (~0.6 s a cold turn, claude-cli.md §14); an HTTP server
  that is already running costs a turn nothing measurable. The server is the official ``mcp``
  SDK's (:mod:`daemon.mcp_face.tools`), run by uvicorn inside the daemon's event loop, so a
  tool call is an in-process command: :class:`~daemon.commands.registry.Registry` validates
  it, raises the same typed errors and publishes the same events as over the socket.
* **A bearer token per session** (:mod:`daemon.mcp_face.tokens`). A loopback port is open to
  every local user, where the Unix socket is not: the token, 256 random bits, is the
  same-uid guarantee. It reaches the CLI in an ``--mcp-config`` file only the daemon's user
  can read (argv is public in ``/proc``). A token is accepted only while a turn of its
  session runs, and it names that turn: every call knows its process, session and agent,
  and a token outliving its turn is refused. It is per session, not per turn, because a
  warm CLI reads its MCP config once, at start, and serves all the session's turns.
* **Loaded at the first turn that uses it.** Importing the SDK and uvicorn takes ~0.5 s of
  CPU; a daemon whose turns never use the face never pays it.
"""

from daemon.mcp_face.face import McpFace

__all__ = ["McpFace"]

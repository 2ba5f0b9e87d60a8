"""The daemon's Agent Client Protocol face: editors (Zed, JetBrains IDEs, Neovim, Emacs, ...)
as clients of daemon sessions.

An editor starts ``python -m daemon.acp`` (or ``ksi-acp``) and speaks ACP (JSON-RPC over
stdio) to it; the face is a client of the running daemon, built on the
``agent-client-protocol`` SDK's agent side (``acp.run_agent``). Its sessions are ordinary
daemon sessions: warm, logged in ``claude_logs/``, in GET_SESSIONS, on the bus, budgeted,
and open to every other client (a script can watch an editor's turn, an editor can load a
session an agent began).

=============================  ===============================================================
ACP                            the daemon
=============================  ===============================================================
``initialize``                 connects (and subscribes to the permission events); advertises
                               ``loadSession``, embedded context, HTTP/SSE MCP, session
                               ``list`` and ``resume``
``session/new``                a new session id, pinned to ``cwd``; its first prompt's SPAWN
                               starts it with that id (``new_session_id``)
``session/prompt``             SPAWN ``stream: true`` with ``permissions: "relay"``: text as
                               ``agent_message_chunk``, tool calls as ``tool_call`` /
                               ``tool_call_update`` (titles and kinds: :mod:`.updates`), then
                               ``usage_update`` (context used, session cost)
``session/cancel``             CANCEL_PROCESS of the running turn (its CLI's process group
                               ends); the prompt answers ``cancelled``
``session/load``               GET_SESSION (cwd must match) and GET_SESSION_HISTORY replayed as
                               ``user_message_chunk`` / ``agent_message_chunk``
``session/resume``, ``list``   the same without the replay; GET_SESSIONS
PERMISSION_REQUEST (its        ``session/request_permission``: allow once, allow for the
sessions)                      session (``remember: "session"``), reject; the daemon's
                               timeout and default decide when the editor does not
``mcpServers`` (new/load)      SPAWN ``mcp_servers`` (stdio, http, sse), with the KSI MCP
                               tools (``ksi_tools``) when the daemon serves its MCP face
=============================  ===============================================================
"""

"""Agents that answer their messages, and messages kept for agents that are away.

A DIRECT_MESSAGE is an event with ``to_agent`` (PUBLISH's ``to_agent``, KSI's
``payload.to``, or a turn's ``send_message`` tool). The bus hands every directed event to
:class:`~daemon.agents.mailbox.Mailboxes` as it is published, and it keeps one of two
queues per agent, both in SQLite (``agent_messages``) so that a restart loses neither:

* **answer**: the recipient is registered with ``respond_to_messages: true``. Its messages
  are answered one at a time, in the order they were published: each runs a turn in the
  agent's most recent session (its profile's model, cwd, tools...), with the message as the
  prompt, and the turn's answer goes back to the sender as a DIRECT_MESSAGE (same
  ``conversation_id``, ``in_reply_to`` = the message's seq).
* **offline**: nobody is there to take it (no subscription of the recipient receives
  DIRECT_MESSAGE, and it does not answer on its own). It is kept until a connection
  subscribes as that agent, which then receives the kept messages first, in order.

Conversations end, with a CONVERSATION_ENDED event saying why, when an answer ends with a
line ``[END]`` (or ``[TERMINATE]``), after ``max_turns`` answering turns, or once their
cost reaches ``max_cost_usd`` (the first message's ``payload`` may set both; the defaults
are settings). A message in an ended conversation is not answered, so two agents cannot
talk forever at the user's expense.

A paid turn is never run twice: a message whose turn had started when the daemon stopped
is not run again; after the restart its turn's outcome (an async turn queued at the stop
runs then) is awaited and answered, or, if it is gone, reported as AGENT_REPLY_FAILED.
"""

"""The response queue of a served model (serving/responses.py): updates are sent in order by a
thread of their own, and the queued streaming updates of one returned sequence are merged into
one response carrying all their tokens. Oracle: the concatenation of the updates as queued (what
a client must receive), and the reply's last update carrying the final flag. The real server
sends through it in every serving test (tests/test_serving.py and others)."""

from __future__ import annotations

import threading

from tidar.serving.responses import Outgoing, ResponseQueue, coalesce


class Reply:
    """A stand-in for the model's reply: only its identity matters to the queue."""


def update(reply, index, text, tokens, final=False, **state):
    return Outgoing(reply, index, text, list(tokens), [0.5 * t for t in tokens], state, final)


def received(items):
    """{(reply, index): (text, tokens, log probs)} of `items` as a client would join them."""
    joined = {}
    for item in items:
        text, tokens, log_probs = joined.get(item.key, ("", [], []))
        joined[item.key] = (text + item.text, tokens + item.token_ids, log_probs + item.log_probs)
    return joined


def test_coalesce_merges_each_sequence_and_keeps_the_final_flag_last():
    a, b = Reply(), Reply()
    pending = [update(a, 0, "x", [1], step=1), update(b, 0, "p", [7], step=1), update(a, 1, "y", [2], step=1),
               update(a, 0, "z", [3], step=2), update(a, 1, "w", [4], final=False, step=2),
               update(b, 0, "q", [8], final=True, step=2), update(a, 0, "!", [5], final=True, step=3)]
    merged = coalesce(pending)
    assert received(merged) == received(pending)
    assert len(merged) == 3  # one per (reply, sequence)
    assert [m.key for m in merged if m.reply is a][-1] == (id(a), 0) and merged[-1].final  # a's final stays last
    assert [m.state["step"] for m in merged if m.key == (id(a), 0)] == [3]  # the state after the last update
    assert [m.final for m in merged if m.reply is b] == [True]


def test_an_error_is_never_merged_and_ends_its_reply():
    a, b = Reply(), Reply()
    pending = [update(a, 0, "x", [1]), Outgoing(a, error=("bad", 3), final=True), update(a, 0, "late", [9]),
               update(b, 0, "p", [7])]
    merged = coalesce(pending)
    assert [(m.reply, m.error, m.text) for m in merged] == [(a, None, "x"), (a, ("bad", 3), ""), (b, None, "p")]


def test_nothing_of_a_reply_follows_its_final_update():
    a = Reply()
    merged = coalesce([update(a, 0, "x", [1], final=True), update(a, 0, "y", [2])])
    assert [(m.text, m.final) for m in merged] == [("x", True)]


def test_the_queue_sends_in_order_and_merges_what_waited():
    """While the first send blocks, eleven more updates queue up; they leave as one response per
    sequence, and the client's joined text equals the updates'."""
    first_sent, release = threading.Event(), threading.Event()
    sent = []

    def send(item):
        sent.append(item)
        if len(sent) == 1:
            first_sent.set()
            release.wait(10)

    queue = ResponseQueue(send, name="test-responses")
    a, b = Reply(), Reply()
    updates = [update(a, 0, "t0", [0])]
    queue.put(updates[0])
    assert first_sent.wait(10)
    for step in range(1, 12):
        item = update(a if step % 2 else b, 0, f"t{step}", [step], final=step >= 10)
        updates.append(item)
        queue.put(item)
    release.set()
    queue.close()
    assert received(sent) == received(updates)
    assert len(sent) == 3 and queue.sent == 3 and queue.queued == 12
    assert sent[-1].final and sent[1].final  # each reply's one merged response carries its final flag


def test_a_failing_send_does_not_stop_the_others():
    sent = []

    def send(item):
        if item.text == "boom":
            raise RuntimeError("the client is gone")
        sent.append(item.text)

    queue = ResponseQueue(send, name="test-responses")
    a, b = Reply(), Reply()
    queue.put(update(a, 0, "boom", [1], final=True))
    queue.put(update(b, 0, "fine", [2], final=True))
    queue.close()
    assert sent == ["fine"]

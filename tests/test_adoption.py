"""A process dies for good in the middle of replies: another one, sharing its PostgreSQL database,
answers each stranded question once, within `[bot] adopt_after_s`, in the message the dead process had
posted for it; when the dead process is started again, nothing is answered twice (tests/adoption.py)."""

from __future__ import annotations

from tests.adoption import run_adoption
from tests.test_adoption_cases import ADOPTED
from tests.test_process_faults import REPLY

ADOPT_AFTER_S = 4.0


async def test_a_live_process_answers_a_dead_ones_questions_once_in_the_messages_it_began(tmp_path, postgres_url):
    adoption = await run_adoption(tmp_path, postgres_url, ADOPT_AFTER_S)
    print(f"adoption: both stranded questions answered {adoption.delay:.1f} s after the kill (adopt_after_s = {ADOPT_AFTER_S:g})")
    # A dead process's lease runs out after half the delay and stranded questions are looked for every
    # quarter: found within three quarters of it; then answered, which takes a moment on a busy machine.
    assert adoption.delay <= ADOPT_AFTER_S + 2.0, adoption.delay
    for question, begun in adoption.begun.items():
        assert adoption.answers[question] == [(begun[0], f"{REPLY}\n\n{ADOPTED}")]  # the dead process's message, edited
    assert sorted(conversation.rsplit(":", 1)[1] for conversation in adoption.resumed) == sorted(adoption.begun)
    assert adoption.model_requests == 4  # two cut short by the kill, two answers from the live process
    assert adoption.found_on_return == [0]  # back again, the dead process finds nothing left to answer
    assert adoption.statuses == [0, 0] and adoption.errors == []

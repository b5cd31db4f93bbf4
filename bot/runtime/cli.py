"""The `idefics-bot` command: run, chat, ask, render, sync-commands, tiny-checkpoint.

Every failure a person can cause (a bad config, a missing model, a bad image) ends with a short
message on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from bot.core.prompt import chat_of, clean_text
from bot.core.tasks import TASKS, FewShotPair, TaskError, build_task
from bot.images.fetch import short
from bot.runtime.config import DEFAULT_CONFIG_PATH, Config, load_config
from bot.runtime.health import HealthUnavailable
from bot.runtime.logs import setup_logging
from bot.sdk.adapter import AdapterMissing
from bot.sdk.settings import AdapterSettings
from bot.settings import ConfigError, MiB
from bot.state.store import StoreError
from ground.conversation import Author, ConversationKey, ImageRef, Turn
from ground.files import FileTooLarge, NotARegularFile, read_regular_file
from ground.images import ModelImage
from model.instruct import render_instruct
from model.service import Chat, ModelInfo, ModelLoadError

EXIT_USAGE = 2
# The adapter `idefics-bot chat` runs: a conversation in this terminal.
TERMINAL = "terminal"
# Of [bot] shutdown_grace_s, the last part: for closing the state and ending the process.
_EXIT_S = 0.5
# Far more than any conversation the model can read; enough to bound what a stray file costs.
MAX_CONVERSATION_BYTES = 16 * 1024 * 1024

log = logging.getLogger(__name__)


class CommandError(Exception):
    """Ends the command with this message on stderr."""


def _ways_to_enable(config: Config) -> list[str]:
    """How to turn on each installed adapter that needs secrets, in one line each."""
    from bot.sdk.adapter import installed_adapters

    ways = []
    for name in installed_adapters():
        section = config.section(name)
        needed = section.secrets_needed(section.__dict__) if isinstance(section, AdapterSettings) else []
        if isinstance(section, AdapterSettings) and needed:
            variables = " and ".join(section.environment[key] for key in needed)
            keys = " and ".join(f"[{name}] {key}" for key in needed)
            ways.append(f"To put the bot into {name}: set {variables} (or {keys} in config.toml).")
    return ways


def _nothing_enabled(config: Config, source: str) -> str:
    from bot.sdk.adapter import installed_adapters

    alone = [name for name in installed_adapters() if getattr(config.section(name), "runs_alone", False)]
    unblock = "".join(f"\nFor the {name} adapter, which needs no account: leave out [{name}] enabled = false." for name in alone)
    return f"""No chat platform is enabled ({source}), so there is nothing to run yet.
{unblock}
{chr(10).join(_ways_to_enable(config))}
The README's sections on each platform list the permissions and set-up they need.
Then run `idefics-bot run` again.

To chat with the model in this terminal instead:
  idefics-bot chat            (downloads HuggingFaceM4/idefics-9b-instruct, about 20 GB)
  idefics-bot tiny-checkpoint ./tiny-idefics && idefics-bot chat --model ./tiny-idefics
                              (offline, a tiny random model: it answers gibberish)"""


def _running_alone(config: Config, names: list[str]) -> str:
    """Said when only adapters that run alone run: what else there is."""
    keep = " and ".join(f"[{name}] enabled = true" for name in names)
    return f"""No other chat platform is configured, so the bot runs: {", ".join(names)} (its address follows once the model is loaded).
{chr(10).join(_ways_to_enable(config))}
(The README's sections on each platform say how; with {keep} it keeps running alongside them.)"""


def _slow_here(config: Config) -> str | None:
    """Said first when the default (9B) checkpoint would run on a machine without a GPU: how slow,
    and how to start with SmolVLM instead."""
    from model.loading import DEFAULT_CHECKPOINT, SMALL_CHECKPOINT

    if config.model.backend != "local" or config.model.checkpoint != DEFAULT_CHECKPOINT:
        return None
    import torch

    if torch.cuda.is_available():
        return None
    return (
        f"No GPU here: {DEFAULT_CHECKPOINT} (9 billion parameters) answers at about a token a second or slower on "
        f"this machine's CPU. To start on a laptop, use SmolVLM instead: `idefics-bot run --model {SMALL_CHECKPOINT}` "
        f'(or [model] checkpoint = "{SMALL_CHECKPOINT}" in config.toml), a 0.5 GB download that answers at useful speed '
        '(README "Try it").'
    )


def _config(args: argparse.Namespace) -> Config:
    config = load_config(args.config).with_checkpoint(getattr(args, "model", None))
    # In the terminal commands, INFO lines would interleave with the conversation.
    level = config.logging.level if args.command == "run" else "WARNING"
    setup_logging(level, config.logging.json_lines)
    return config


# -- run -------------------------------------------------------------------------------------


async def run_bot(config: Config, source: str, stop: asyncio.Event | None = None) -> None:
    """Start every enabled platform's adapter on one shared model service and run until SIGINT or
    SIGTERM (or until `stop` is set, for callers that manage their own signals, such as tests)."""
    from bot.core.retention import keep_pruned
    from bot.runtime.app import Runtime, enabled_adapters
    from bot.runtime.health import HealthServer

    slow = _slow_here(config)
    if slow:
        print(slow, file=sys.stderr, flush=True)
    names = enabled_adapters(config)
    if not names:
        raise CommandError(_nothing_enabled(config, source))
    if all(getattr(config.section(name), "enabled", False) is None for name in names):
        print(_running_alone(config, names), file=sys.stderr, flush=True)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
    async with Runtime.open(config) as runtime:
        adapters = [runtime.adapter(name) for name in names]
        started = []
        health = None
        deadline: float | None = None  # set when the shutdown starts: the end of its grace
        pruning: asyncio.Task | None = None
        try:
            if config.health.enabled:
                health = HealthServer(
                    config.health.host,
                    config.health.port,
                    runtime.model,
                    runtime.metrics,
                    lambda: {adapter.name: getattr(adapter, "connected", True) for adapter in adapters},
                )
                await health.start()
            for adapter in adapters:
                await adapter.start()
                started.append(adapter)
            pruning = asyncio.create_task(keep_pruned(config, runtime.store, runtime.model.info), name="prune")
            broken = await _until_stopped_or_broken(stop, started)
            grace = config.bot.shutdown_grace_s
            # Adapters close by then; the rest is kept for closing the state and ending the process.
            deadline = asyncio.get_running_loop().time() + grace - min(_EXIT_S, grace / 8)
            log.info("shutdown.started", extra={"grace_s": grace})
            await runtime.shutdown(grace)
            if broken:
                raise CommandError(
                    "; ".join(f"The {adapter.name} connection was lost and couldn't be restored ({adapter.failure})" for adapter in broken)
                    + ". Stopped, so that a service manager can restart the bot."
                )
        finally:
            if pruning is not None:
                pruning.cancel()
            for adapter in reversed(started):
                try:
                    async with asyncio.timeout_at(deadline):
                        await adapter.stop()
                except TimeoutError:
                    log.warning("shutdown.adapter_slow", extra={"adapter": adapter.name})
            if health is not None:
                await health.stop()


async def _until_stopped_or_broken(stop: asyncio.Event, adapters: list) -> list:
    """Wait for `stop`, or for an adapter to give up on its connection (an adapter that can fail
    has a `failed` event and a `failure` reason); returns the adapters that gave up."""
    waits = [asyncio.create_task(stop.wait())] + [asyncio.create_task(adapter.failed.wait()) for adapter in adapters if hasattr(adapter, "failed")]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    broken = [adapter for adapter in adapters if getattr(adapter, "failure", None)]
    for adapter in broken:
        log.error("run.adapter_failed", extra={"adapter": adapter.name, "reason": adapter.failure})
    return broken


# -- sync-commands ---------------------------------------------------------------------------


async def sync_commands(config: Config, source: str) -> int:
    """Publish the chat commands of every enabled platform that has them, changed or not (adapters
    keep in the state what they published). The services open as for `run`, model included."""
    from bot.runtime.app import Runtime, enabled_adapters

    names = enabled_adapters(config)
    if not names:
        raise CommandError(_nothing_enabled(config, source))
    async with Runtime.open(config) as runtime:
        for name in names:
            publish = getattr(runtime.adapter(name), "sync_commands", None)
            if publish is None:
                print(f"{name}: has no commands to publish.")
                continue
            scopes = await publish()
            print(f"{name}: published the commands to {', '.join(scopes) or 'nowhere (refused: see the log)'}.")
    return 0


# -- chat ------------------------------------------------------------------------------------


async def chat(config: Config) -> int:
    """The terminal chat: the terminal adapter on this process's engine."""
    from bot.runtime.app import Runtime

    remote = {"tgi": "the TGI server", "openai": f"{config.model.model} on the model server"}.get(config.model.backend)
    print(f"Connecting to {remote} at {config.model.url} ..." if remote else f"Loading {config.model.checkpoint} ...", file=sys.stderr)
    async with Runtime.open(config) as runtime:
        session: Any = runtime.adapter(TERMINAL)  # the terminal adapter, which also has wait_closed()
        await session.start()
        try:
            await session.wait_closed()
        finally:
            await session.stop()
    return 0


# -- ask -------------------------------------------------------------------------------------


async def ask(config: Config, images: list[str], question: str, task: str, labels: str) -> int:
    from bot.runtime.app import Runtime
    from bot.sdk.files import local_attachment
    from bot.state.store import SQLiteStore
    from ground.messages import Final, TaskRequest

    with tempfile.TemporaryDirectory(prefix="idefics-ask-") as scratch:
        # One-off questions leave no state behind.
        async with Runtime.open(config, store=await SQLiteStore.open(Path(scratch) / "state.sqlite3")) as runtime:
            engine = runtime.engine
            request = TaskRequest(
                task=task,
                key=ConversationKey("cli", "ask"),
                author=Author("cli", "you"),
                attachments=tuple(local_attachment(source, engine.intake) for source in images),
                question=question,
                labels=labels,
            )
            final = Final("", ("No reply.",))
            async for event in engine.run_task(request):
                if isinstance(event, Final):
                    final = event
    for note in final.notes:
        print(note, file=sys.stderr)
    if not final.text:
        return 1
    print(final.text)
    return 0


# -- prune -----------------------------------------------------------------------------------


def possible_models(config: Config) -> list[ModelInfo]:
    """How the models the bot may run with have their images prepared, for keeping the few-shot
    images without loading one (`idefics-bot prune`): the local checkpoint's processor config when it
    is a folder here, and every backend's known sizes (224, OpenAI's 512, TGI's longest edges), as a
    checkpoint elsewhere or a server may be any of them. Keeping an extra digest or two costs nothing."""
    from model.openai import IMAGE_SIDE
    from model.tgi import LONGEST_EDGE

    name = config.model.checkpoint
    models = [ModelInfo(name), ModelInfo(name, image_size=IMAGE_SIDE)]
    models += [ModelInfo(name, image_longest_edge=edge) for edge in LONGEST_EDGE.values()]
    processor = _image_processor_config(Path(name))
    size = processor.get("size")
    if isinstance(size, dict) and isinstance(size.get("longest_edge"), int):  # Idefics3, SmolVLM
        models.append(ModelInfo(name, image_longest_edge=size["longest_edge"]))
    elif isinstance(size, dict) and isinstance(size.get("height"), int):  # IDEFICS v1
        models.append(ModelInfo(name, image_size=size["height"]))
    elif isinstance(processor.get("image_size"), int):
        models.append(ModelInfo(name, image_size=processor["image_size"]))
    return models


def _image_processor_config(checkpoint: Path) -> dict:
    """The image processor's saved settings in a checkpoint folder (empty if there are none here):
    processor_config.json holds them under "image_processor", an older preprocessor_config.json alone."""
    for file, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        try:
            settings = json.loads((checkpoint / file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        settings = settings.get(key) if key and isinstance(settings, dict) else settings
        if isinstance(settings, dict):
            return settings
    return {}


async def prune_state(config: Config, dry_run: bool) -> int:
    """Delete now what the state no longer keeps (see bot.core.retention), or say what would go."""
    from bot.core.retention import prune
    from bot.runtime.app import open_store

    store = await open_store(config)
    try:
        gone = await prune(config, store, possible_models(config), dry_run)
    finally:
        await store.close()
    days = config.state.retention_days
    turns = f"{gone.turns} turns older than {days:g} days" if days is not None else "no turns ([state] retention_days is not set)"
    print(f"{'Would delete' if dry_run else 'Deleted'} {turns} and {gone.images} images nothing refers to ({gone.image_bytes / MiB:.1f} MB).")
    if dry_run:
        print("\n".join(f"  image {digest}" for digest in gone.digests))
    return 0


# -- render ----------------------------------------------------------------------------------


def load_conversation(path: Path) -> tuple[list[Turn], bool, str | None]:
    """Turns from a conversation JSON file:
    {"shared": false, "system_prompt": "...", "turns": [
        {"role": "user", "name": "Ann", "parts": ["What is this?", {"image": "dog.png"}]},
        {"role": "assistant", "text": "A dog."}]}"""
    try:
        data = json.loads(read_regular_file(path, MAX_CONVERSATION_BYTES).decode("utf-8"))
    except OSError as exc:
        raise CommandError(f"{path} can't be read: {exc.strerror}.") from None
    except NotARegularFile as odd:
        raise CommandError(str(odd)) from None
    except FileTooLarge as too_large:
        raise CommandError(f"{path} is {too_large.size / MiB:.1f} MB; a conversation file may have {MAX_CONVERSATION_BYTES / MiB:g} MB.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CommandError(f"{path} is not valid JSON: {exc}.") from None
    except RecursionError:
        raise CommandError(f"{path} is not a conversation: its JSON is nested too deeply.") from None
    if not isinstance(data, dict) or not isinstance(data.get("turns"), list):
        raise CommandError(f'{path}: expected an object with a "turns" list.')
    turns = []
    for number, raw in enumerate(data["turns"], start=1):
        where = f"{path}: turn {number}"
        if not isinstance(raw, dict) or raw.get("role") not in ("user", "assistant"):
            raise CommandError(f'{where}: needs "role": "user" or "assistant".')
        if raw["role"] == "assistant":
            turns.append(Turn("assistant", (str(raw.get("text", "")),)))
            continue
        parts = raw.get("parts", [raw["text"]] if "text" in raw else [])
        if not isinstance(parts, list):
            raise CommandError(f'{where}: "parts" must be a list of texts and {{"image": "file name"}} objects.')
        converted: list = []
        for part in parts:
            if isinstance(part, str):
                converted.append(clean_text(part))
            elif isinstance(part, dict) and isinstance(part.get("image"), str):
                converted.append(ImageRef(digest="", name=part["image"]))
            else:
                raise CommandError(f'{where}: each part is a text or {{"image": "file name"}}, not {short(repr(part))}.')
        name = str(raw.get("name", "user"))
        turns.append(Turn("user", tuple(converted), Author(name, name)))
    system_prompt = data.get("system_prompt")
    return turns, bool(data.get("shared", False)), system_prompt if isinstance(system_prompt, str) else None


def _item_lines(items: list) -> list[str]:
    return [f"<image {item.name}>" if isinstance(item, (ImageRef, ModelImage)) else json.dumps(item, ensure_ascii=False) for item in items]


class _Renderer:
    """What the configured model receives for a chat, one item a line (images by name): rendered by
    the local model's family (its chat template, read from the checkpoint without loading the
    weights), as an OpenAI-compatible server's messages, or in IDEFICS v1's instruct format (the TGI
    backend's, and a checkpoint not at hand)."""

    def __init__(self, config: Config):
        from model.loading import prompt_family

        self.openai = config.model.backend == "openai"
        try:
            self.family = prompt_family(config.model.checkpoint) if config.model.backend == "local" else None
        except ModelLoadError as error:
            raise CommandError(str(error)) from None
        # What people typed is cleaned of the model's own special tokens too.
        self.special_tokens = self.family.special_tokens if self.family is not None else ()

    def lines(self, chat: Chat) -> list[str]:
        if self.openai:
            from model.openai import render_messages

            return _item_lines(render_messages(chat))
        return _item_lines(self.family.render(chat) if self.family is not None else render_instruct(chat))


def render_lines(config: Config, path: Path) -> list[str]:
    turns, shared, system_prompt = load_conversation(path)
    prompt = system_prompt if system_prompt is not None else config.conversation.system_prompt
    renderer = _Renderer(config)
    return renderer.lines(chat_of(turns, prompt, shared, renderer.special_tokens))


def render_task_lines(config: Config, task: str, images: list[str], question: str, labels: str) -> list[str]:
    """The prompt of a one-off task on images named `images` (not read), then its generation settings."""
    renderer = _Renderer(config)
    try:
        prompt = build_task(
            task,
            [ImageRef(digest="", name=name) for name in images],
            question=question,
            labels=labels,
            examples=[FewShotPair(ImageRef(digest="", name=example.image.name), example.text) for example in config.tasks.few_shot],
            system_prompt=config.conversation.system_prompt,
            max_new_tokens={str(task): tokens for task, tokens in config.tasks.max_new_tokens.items()},
            num_beams={str(task): beams for task, beams in config.tasks.num_beams.items()},
            special_tokens=renderer.special_tokens,
        )
    except TaskError as error:
        raise CommandError(str(error)) from None
    if prompt.labels:
        return [*renderer.lines(prompt.chat), f"# ranks {len(prompt.labels)} labels by likelihood: {json.dumps(prompt.labels, ensure_ascii=False)}"]
    return [*renderer.lines(prompt.chat), f"# max_new_tokens={prompt.max_new_tokens} num_beams={prompt.num_beams}"]


# -- the command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idefics-bot", description="IDEFICS, the vision-language model, in Discord, Slack, a web chat and your terminal.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, model: bool = True) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--config", type=Path, help="TOML config (default: ./config.toml if present, else built-in defaults)")
        if model:
            command.add_argument("--model", metavar="PATH_OR_ID", help="checkpoint to load instead of [model] checkpoint")
        return command

    add("run", "Run the bot on every chat platform enabled in the config.")
    add("chat", "Chat with the model in this terminal (/image PATH_OR_URL, /reset, /quit).")
    add("sync-commands", "Publish the chat commands (Discord's slash commands) now; `run` publishes them only when they changed.", model=False)
    ask_command = add("ask", "Ask one question about one or more images and print the answer.")
    ask_command.add_argument("--image", action="append", default=[], metavar="PATH_OR_URL", help="an image file or http(s) link (repeatable)")
    ask_command.add_argument("--task", choices=TASKS, default="chat", help="prompt template (default: chat)")
    ask_command.add_argument("--labels", default="", help='labels for --task classify, e.g. "cat, dog, bird"')
    ask_command.add_argument("question", nargs="?", default="", help="the question (optional for caption, classify and story)")
    render_command = add("render", "Print the exact model input for a conversation given as JSON, or for a task.")
    source = render_command.add_mutually_exclusive_group(required=True)
    source.add_argument("--conversation", type=Path, metavar="FILE.json")
    source.add_argument("--task", choices=TASKS, help="a one-off task: prints its prompt and generation settings")
    render_command.add_argument("--image", action="append", default=[], metavar="NAME", help="an image name for --task (not read; repeatable)")
    render_command.add_argument("--question", default="", help="the question for --task vqa or chat")
    render_command.add_argument("--labels", default="", help='labels for --task classify, e.g. "cat, dog, bird"')
    prune_command = add("prune", "Delete now the turns older than [state] retention_days and the images nothing refers to.", model=False)
    prune_command.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    tiny = commands.add_parser("tiny-checkpoint", help="Write a tiny random IDEFICS checkpoint (for trying the bot offline and for tests).")
    tiny.add_argument("directory", type=Path)
    tiny.add_argument("--family", choices=("idefics", "idefics3"), default="idefics", help="IDEFICS v1 (default) or Idefics3 (SmolVLM's layout)")
    return parser


def _end_now(status: int) -> NoReturn:
    """End the process at once, with the log flushed: threads that outlive the event loop (a model
    step still running, a stuck worker) are not waited for, so `run` ends within
    [bot] shutdown_grace_s. The state is closed by then; nothing is lost."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "tiny-checkpoint":
            from model.tiny import write_tiny_checkpoint

            path = write_tiny_checkpoint(args.directory, family=args.family)
            kind = "Idefics3" if args.family == "idefics3" else "IDEFICS"
            print(f"Wrote a tiny random {kind} checkpoint to {path}. Try: idefics-bot chat --model {path}")
            return 0
        config = _config(args)
        if args.command == "render":
            if args.task:
                print("\n".join(render_task_lines(config, args.task, args.image, args.question, args.labels)))
            else:
                print("\n".join(render_lines(config, args.conversation)))
            return 0
        if args.command == "ask":
            if args.task == "classify" and not args.labels:
                raise CommandError('--task classify needs --labels, e.g. --labels "cat, dog, bird".')
            return asyncio.run(ask(config, args.image, args.question, args.task, args.labels))
        if args.command == "chat":
            return asyncio.run(chat(config))
        if args.command == "prune":
            return asyncio.run(prune_state(config, args.dry_run))
        source = args.config or (DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else "built-in defaults")
        if args.command == "sync-commands":
            return asyncio.run(sync_commands(config, str(source)))
        asyncio.run(run_bot(config, str(source)))
        _end_now(0)
    except (CommandError, ConfigError, ModelLoadError, StoreError, AdapterMissing, HealthUnavailable) as error:
        print(f"idefics-bot: {error}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, ConfigError) else 1
    except KeyboardInterrupt:
        return 130

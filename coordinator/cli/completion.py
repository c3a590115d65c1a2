"""`tether completion bash|zsh|fish`: shell completion written from the parser itself, so
every command and option the CLI has is completed, and nothing it does not have."""

from __future__ import annotations

import argparse
import shlex


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # argparse offers no public way to list subparsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted({o for a in parser._actions for o in a.option_strings if o.startswith("--")})


def _choices(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    return {o: [str(c) for c in a.choices] for a in parser._actions if a.choices
            and not isinstance(a, argparse._SubParsersAction) for o in a.option_strings}


def bash(parser: argparse.ArgumentParser) -> str:
    commands = _commands(parser)
    cases = []
    for name, sp in sorted(commands.items()):
        values = [f"    {shlex.quote(o)}) COMPREPLY=($(compgen -W {shlex.quote(' '.join(v))} "
                  f'-- "$cur")); return;;' for o, v in sorted(_choices(sp).items())]
        cases.append(f"  {name})\n   case \"$prev\" in\n" + "\n".join(values)
                     + ("\n" if values else "")
                     + f"   esac\n   COMPREPLY=($(compgen -W {shlex.quote(' '.join(_options(sp)))}"
                     ' -- "$cur"));;')
    return f"""# tether completion for bash: source it, e.g. from ~/.bashrc:
#   source <(tether completion bash)
_tether() {{
 local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} cmd= i
 local commands={shlex.quote(" " + " ".join(sorted(commands)) + " ")}
 for ((i = 1; i < COMP_CWORD; i++)); do  # the first word that is a command
  case $commands in *" ${{COMP_WORDS[i]}} "*) cmd=${{COMP_WORDS[i]}}; break;; esac
 done
 case $cmd in
  "") COMPREPLY=($(compgen -W {shlex.quote(' '.join(sorted(commands)) + ' ' +
                                           ' '.join(_options(parser)))} -- "$cur"));;
{chr(10).join(cases)}
 esac
}}
complete -o default -F _tether tether
"""


def zsh(parser: argparse.ArgumentParser) -> str:
    commands = _commands(parser)
    lines = ["#compdef tether", "# tether completion for zsh: put it on $fpath as _tether,",
             "# or: source <(tether completion zsh)", "_tether() {",
             "  local -a commands", "  commands=("]
    for name, sp in sorted(commands.items()):
        text = (sp.description or name).split(".")[0].replace("'", "")
        lines.append(f"    '{name}:{text}'")
    lines += ["  )", "  if (( CURRENT == 2 )); then", "    _describe command commands",
              "    return", "  fi", "  case $words[2] in"]
    for name, sp in sorted(commands.items()):
        lines.append(f"    {name}) compadd -- {' '.join(_options(sp))} ;;")
    lines += ["  esac", "}", "compdef _tether tether", ""]
    return "\n".join(lines)


def fish(parser: argparse.ArgumentParser) -> str:
    commands = _commands(parser)
    lines = ["# tether completion for fish: tether completion fish | source",
             "complete -c tether -f"]
    for name, sp in sorted(commands.items()):
        text = (sp.description or name).split(".")[0].replace("'", "")
        lines.append(f"complete -c tether -n __fish_use_subcommand -a {name} -d '{text}'")
        for option in _options(sp):
            lines.append(f"complete -c tether -n '__fish_seen_subcommand_from {name}' "
                         f"-l {option[2:]}")
    return "\n".join(lines) + "\n"


SHELLS = {"bash": bash, "zsh": zsh, "fish": fish}

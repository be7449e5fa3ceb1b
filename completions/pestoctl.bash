# SPDX-License-Identifier: GPL-2.0-or-later
# bash completion for pestoctl (install as /usr/share/bash-completion/completions/pestoctl).
# pestod's completions are generated from its command line: pestod --generate-completion-script bash

_pestoctl() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD - 1]}
    case $prev in
    -C | --clear | --table)
        mapfile -t COMPREPLY < <(compgen -W "HOST SPLICE" -- "$cur")
        return
        ;;
    -t | --tcp-ports | -u | --udp-ports | -T | --tcp-ns | -U | --udp-ns)
        mapfile -t COMPREPLY < <(compgen -W "none all auto" -- "$cur")
        return
        ;;
    --address | --id | --owner)
        return
        ;;
    esac
    if [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "-A --add -D --delete -C --clear -t --tcp-ports -u --udp-ports
            -T --tcp-ns -U --udp-ns -s --show -d --debug -h --help --version --best-effort --id --owner -q --quiet
            --silent --json --system --session --address --table" -- "$cur")
        return
    fi
    # A command, or upstream pesto's PATH operand (accepted, not used).
    mapfile -t COMPREPLY < <(compgen -W "status watch" -- "$cur"; compgen -f -- "$cur")
}
complete -F _pestoctl pestoctl

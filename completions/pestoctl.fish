# SPDX-License-Identifier: GPL-2.0-or-later
# fish completion for pestoctl (install as /usr/share/fish/vendor_completions.d/pestoctl.fish).

complete -c pestoctl -s A -l add -d 'following specs add rules'
complete -c pestoctl -s D -l delete -d 'following specs delete exactly matching rules'
complete -c pestoctl -s C -l clear -x -a 'HOST SPLICE' -d 'remove every rule of a table'
complete -c pestoctl -s t -l tcp-ports -x -a 'none all auto' -d 'HOST table, TCP'
complete -c pestoctl -s u -l udp-ports -x -a 'none all auto' -d 'HOST table, UDP'
complete -c pestoctl -s T -l tcp-ns -x -a 'none all auto' -d 'SPLICE table, TCP'
complete -c pestoctl -s U -l udp-ns -x -a 'none all auto' -d 'SPLICE table, UDP'
complete -c pestoctl -s s -l show -d 'show the tables before and after the update'
complete -c pestoctl -s d -l debug -d "print the update's steps on stderr"
complete -c pestoctl -s h -l help -d 'display the help and exit'
complete -c pestoctl -l version -d 'show the version and exit'
complete -c pestoctl -l best-effort -d 'bind failures do not fail the update'
complete -c pestoctl -l id -x -d 'first ID for new rules'
complete -c pestoctl -l owner -x -d 'owner tag of the rules added'
complete -c pestoctl -s q -l quiet -d 'print nothing on success'
complete -c pestoctl -l silent -d 'print nothing on success'
complete -c pestoctl -l json -d 'print JSON (with watch, one object a line)'
complete -c pestoctl -l system -d 'the system bus'
complete -c pestoctl -l session -d 'the session bus'
complete -c pestoctl -l address -x -d 'a D-Bus address'
complete -c pestoctl -l table -x -a 'HOST SPLICE' -d 'the table of status ID'
complete -c pestoctl -n '__fish_use_subcommand' -a 'status' -d "a rule's state, or who holds the lock"
complete -c pestoctl -n '__fish_use_subcommand' -a 'watch' -d 'print changes as they happen'

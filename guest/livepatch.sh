#!/usr/bin/env bash
# Builds the livepatch twin of sample bundle `cmdline` (guest/livepatch/, the
# kernel's samples/livepatch pattern: a hand-written replacement of
# cmdline_proc_show, not generated from the diff) against Debian's headers
# (guest/module.sh). The last line printed is the path of the module.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
exec bash "$here/module.sh" "$here/livepatch" livepatch-cmdline

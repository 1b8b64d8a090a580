#!/usr/bin/env bash
# Build data/corpus/{train,valid,test}.txt from Jane Austen's six novels.
#
# Source: the Debian package r-cran-janeaustenr (CRAN "janeaustenr" 1.0.0 by Julia Silge, MIT licence;
# the novels, 1811-1817, are public domain texts taken from Project Gutenberg). Nothing is downloaded
# except through apt. Idempotent and deterministic: rerunning gives byte-identical files.
#
# Usage: scripts/make_corpus.sh [OUT_DIR]   (default data/corpus; data/ is gitignored)
set -euo pipefail

cd "$(dirname "$0")/.."
out="${1:-data/corpus}"
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3

if ! Rscript -e 'library(janeaustenr)' >/dev/null 2>&1; then
    sudo_=""
    [ "$(id -u)" = 0 ] || sudo_="sudo"
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends r-cran-janeaustenr
fi

mkdir -p "$out"
raw="$out/austen_raw.tsv"
Rscript -e '
library(janeaustenr)
b <- austen_books()
write.table(data.frame(book = as.character(b$book), text = b$text), file = commandArgs(TRUE)[1],
            sep = "\t", quote = FALSE, row.names = FALSE, fileEncoding = "UTF-8")
' "$raw"
"$py" scripts/make_corpus.py "$raw" "$out"
cp /usr/share/doc/r-cran-janeaustenr/copyright "$out/LICENSE.janeaustenr"
sha256sum "$out"/train.txt "$out"/valid.txt "$out"/test.txt

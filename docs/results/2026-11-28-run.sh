# The script behind docs/results.md (2026-11-28), run on the GPU machine as 'bash .devdata/run.sh' with .devdata/
# holding: sma-demo (portable build, see results.md), lib/ (Debian 12's ld-linux, libc, libm), fashion-mnist/ and
# mnist/ (the IDX files, gzipped), spam.tar.gz (the SpamAssassin messages, each cut to its first 16 KiB) and
# kjv.txt.gz (the verse text load_kjv_text produces). $OUT is where the logs go.
#!/bin/bash
# Longer runs of every sma-demo task, in parallel, each on 2 pinned cores (docs/results.md).
set -u
R=$(cd "$(dirname "$0")" && pwd)
W=/tmp/sma-results; mkdir -p $W/spam
tar xzf $R/spam.tar.gz -C $W/spam
gunzip -c $R/kjv.txt.gz > $W/kjv.txt
export SMA_FASHION_MNIST_DIR=$R/fashion-mnist SMA_MNIST_DIR=$R/mnist SMA_SPAM_ASSASSIN_DIR=$W/spam SMA_KJV_TEXT=$W/kjv.txt
{ date -u; uname -a; nproc; grep -m1 "model name" /proc/cpuinfo; grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E '^avx|^fma' | tr '\n' ' '; echo; lscpu; cat /proc/loadavg; } > $OUT/machine.txt 2>&1
BIN="$R/lib/ld-linux-x86-64.so.2 --library-path $R/lib $R/sma-demo"
run() {  # task cores args...
  local t=$1 c=$2; shift 2
  mkdir -p $W/$t
  ( cd $W/$t && echo "command: OMP_NUM_THREADS=2 taskset -c $c sma-demo --task $t --threads 2 $*" &&
    OMP_NUM_THREADS=2 taskset -c $c timeout 560 $BIN --task $t --threads 2 --out-dir $W/$t "$@"; echo "exit status $?"; date -u ) > $OUT/$t.log 2>&1 &
}
run fashion-mnist 0,1 --steps 3000 --time-limit 440
run mnist 2,3 --steps 3000 --time-limit 440
run listops 4,5 --steps 800 --train-size 20000 --time-limit 440
run spam 6,7 --steps 450 --time-limit 440
run kjv-lm 8,9 --steps 1100 --time-limit 440
sleep 5; cat /proc/loadavg >> $OUT/machine.txt
wait
cat /proc/loadavg >> $OUT/machine.txt
cd $W && tar czf $OUT/figures.tar.gz */*.svg

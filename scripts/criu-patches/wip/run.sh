set -u
export WP_DIR=${WP_DIR:-/tmp/uffd-wp-proto}; mkdir -p $WP_DIR; HERE=$(cd "$(dirname "$0")" && pwd); cd $WP_DIR
C=${CRIU:?set CRIU to a criu built with 0005}
rm -rf d1 d2 d3 ready done result grabbed go check && mkdir d1 d2 d3
(setsid python3 $HERE/target.py </dev/null >/dev/null 2>&1 &)
for i in $(seq 100); do [ -s ready ] && break; sleep 0.05; done; PID=$(cat ready); echo pid $PID
step() { rm -f done; touch go; for i in $(seq 200); do [ -s done ] && break; sleep 0.02; done; }
sum() { rm -f result; touch check; for i in $(seq 200); do [ -s result ] && break; sleep 0.02; done; cat result; echo; }
$C pre-dump -t $PID -D d1 -o pre.log -v4 --track-mem --action-script $HERE/grab.py; echo pre rc=$?; cat grabbed
step
$C dump -t $PID -D d2 -o dump.log -v4 --track-mem --prev-images-dir ../d1 --leave-running --action-script $HERE/grab.py; echo dump rc=$?; cat grabbed
S2=$(sum)
step
$C dump -t $PID -D d3 -o dump.log -v4 --track-mem --prev-images-dir ../d2 --action-script $HERE/grab.py; echo dump2 rc=$?
grep -h "uffd-wp\|Error" d1/pre.log d2/dump.log d3/dump.log | grep -v RLIMIT | head
du -b d1/pages-*.img d2/pages-*.img d3/pages-*.img
for i in $(seq 100); do kill -0 $PID 2>/dev/null || break; sleep 0.05; done
$C restore -D d3 -o restore.log -d --pidfile $WP_DIR/rpid; echo restore rc=$?
sleep 0.3; S3=$(sum); echo "after restore: $S3"
python3 - <<'P'
import hashlib
N=16384; mem=bytearray(N*4096)
for i in range(N):
    mem[i*4096:i*4096+8]=i.to_bytes(8,"little"); mem[i*4096+100]=1
for r in (1,2):
    for i in range(0,N,100): mem[i*4096+200]=(r+1)&0xff
print("expected:     ", hashlib.sha256(mem).hexdigest())
P
RP=$(cat $WP_DIR/rpid); grep -q target.py /proc/$RP/cmdline && kill -9 $RP

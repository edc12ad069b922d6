# Sourced by the boot-test /init (build.sh) under vuc.topo=1: what the guest
# scheduler made of the device's capacities and frequencies.  Uses say, VDEV,
# CF from /init.  Every line starts with "VUC: ".

# Each CPU's capacity, the scheduler domains' flags, EAS, the energy model.
topo_show() {
    line=""
    for c in /sys/devices/system/cpu/cpu[0-9]*; do
        line="$line $(basename "$c")=$(cat "$c/cpu_capacity" 2>/dev/null || echo -)"
    done
    say "capacity$line $1"
    mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
    for d in /sys/kernel/debug/sched/domains/cpu*/domain*; do
        [ -d "$d" ] || continue
        say "sd $(basename "$(dirname "$d")") $(basename "$d") name=$(cat "$d/name")" \
            "flags=$(cat "$d/flags" | tr ' ' ',') $1"
    done
    eas=-
    [ -r /proc/sys/kernel/sched_energy_aware ] && eas=$(cat /proc/sys/kernel/sched_energy_aware)
    say "eas sched_energy_aware=$eas" \
        "em=$(ls /sys/kernel/debug/energy_model 2>/dev/null | tr '\n' ',') $1"
    # Each perf domain the kernel's energy model holds: its CPUs, states, and the top state's power.
    for pd in /sys/kernel/debug/energy_model/*; do
        [ -d "$pd" ] || continue
        n=0; top=""
        for ps in "$pd"/ps:*; do
            [ -d "$ps" ] || continue
            n=$((n + 1))
            f=$(cat "$ps/frequency"); p=$(cat "$ps/power")
            [ -z "$top" ] || [ "$f" -gt "${top%%:*}" ] && top="$f:$p"
        done
        say "em-pd $(basename "$pd") cpus=$(cat "$pd/cpus" 2>/dev/null) states=$n top=$top $1"
    done
}

# fie_read CPU: sets J (jiffies), HZ_, S (the CPU's arch_freq_scale), P
# (the scale the shared page gives its domain now), T (the ticks the CPU's
# frequency-scale source ran) and C (the tick at which S last changed) from
# the driver's freq_scale file.  Shell builtins only (no fork): a poll is much shorter
# than a tick.
fie_read() {
    read -r FS_LINE <"$VDEV/cpufreq/freq_scale"
    for w in $FS_LINE; do
        case "$w" in
            jiffies=*) J=${w#*=} ;;
            hz=*) HZ_=${w#*=} ;;
            "cpu$1="*) v=${w#*=}; S=${v%%/*}; v=${v#*/}; P=${v%%/*}; v=${v#*/}; T=${v%%/*}; C=${v#*/} ;;
        esac
    done
}

# fie_arm CPU: the baseline, read before the host is asked to change.
fie_arm() {
    [ -r "$VDEV/cpufreq/freq_scale" ] || return 0
    fie_read "$1"
    S0=$S; P0=$P; JS=$J
    say "fie-start cpu=$1 scale=$S0 page=$P0 hz=$HZ_"
}

# fie_watch CPU SECS (after fie_arm): poll until the page's scale for CPU's
# domain changes (the host changed), then until the CPU's arch_freq_scale
# equals it.  The host changed the page between the last poll that saw the
# old value (tick TP) and the first that saw the new one (tick T0); the source
# changed the scale at tick C.  lag_ticks = C - T0 (<= 0: before the guest
# could see it), lag_ticks_max = C - TP, both in the CPU's own ticks (a vCPU
# its host did not run for a while ticks late while jiffies move on).
fie_watch() {
    if [ ! -r "$VDEV/cpufreq/freq_scale" ]; then
        say "fie-follow none"
        return
    fi
    J0=""; n=0; n0=0; TP=$T
    while :; do
        fie_read "$1"
        n=$((n + 1))
        [ -z "$J0" ] && [ "$P" = "$P0" ] && TP=$T
        if [ -z "$J0" ] && [ "$P" != "$P0" ]; then J0=$J; T0=$T; n0=$n; fi
        if [ -n "$J0" ] && [ "$S" = "$P" ]; then
            say "fie-follow cpu=$1 before=$S0/$P0 after=$S/$P lag_ticks=$((C - T0))" \
                "lag_ticks_max=$((C - TP)) lag_jiffies=$((J - J0)) polls=$((n - n0))" \
                "poll_jiffies=$(( (J - JS) / n )) hz=$HZ_"
            return
        fi
        if [ $((J - JS)) -gt $(($2 * HZ_)) ]; then
            say "fie-timeout cpu=$1 scale=$S page=$P first_change=${J0:-none}"
            return
        fi
    done
}

# cpu_of PID: sets CPU to the CPU the task last ran on (/proc/PID/stat field
# 39), with shell builtins only: a sampler that forks (cut) every 100 ms is
# itself a load on the vCPU it runs on under TCG, and would skew placement.
cpu_of() {
    read -r _stat <"/proc/$1/stat"
    set -- $_stat
    shift 38
    CPU=$1
}

# light_task: a little work, then 50 ms asleep, forever, with shell builtins
# only.  Forking usleep every period made these tasks anything but light
# under TCG (an exec is emulated: util_avg up to 158, a whole little vCPU),
# so they sleep in read -t on a FIFO nobody writes.
light_task() {
    [ -p /tmp/light.fifo ] || mkfifo /tmp/light.fifo
    exec 3<>/tmp/light.fifo
    while :; do
        i=0
        while [ $i -lt 20 ]; do i=$((i + 1)); done
        read -r -t 0.05 _x <&3
    done
}

# placement SECS: after "placement-start", one CPU-bound task and two light ones (a little work, then
# 50 ms asleep), no affinity; where each runs, sampled every 100 ms from
# /proc/PID/stat (field 39, the CPU it last ran on; cpu_of).
placement() {
    say "placement-start"
    sleep 1    # the test sets the host's frequencies (a host whose vCPU threads are busy)
    sh -c 'while :; do :; done' &
    HEAVY=$!
    light_task &
    L1=$!
    light_task &
    L2=$!
    sleep 1    # let the heavy task's utilisation grow
    h=""; l=""; k=0
    while [ $k -lt $(($1 * 10)) ]; do
        cpu_of $HEAVY; h="$h$CPU,"
        cpu_of $L1; l="$l$CPU,"
        cpu_of $L2; l="$l$CPU,"
        usleep 100000
        k=$((k + 1))
    done
    kill $HEAVY $L1 $L2
    wait $HEAVY $L1 $L2 2>/dev/null
    say "placement heavy=${h%,} light=${l%,}"
}

# placement_light SECS: the two light tasks alone.  With a CPU-bound task
# the big vCPU is over its capacity margin, the root domain is overutilised
# and EAS stands aside (the load balancer places tasks); alone, light tasks
# are placed at wake-up by EAS when it runs, by capacity otherwise.
placement_light() {
    say "placement-light-start"
    light_task &
    L1=$!
    light_task &
    L2=$!
    sleep 1
    l=""; k=0
    while [ $k -lt $(($1 * 10)) ]; do
        cpu_of $L1; l="$l$CPU,"
        cpu_of $L2; l="$l$CPU,"
        usleep 100000
        k=$((k + 1))
        [ $k = $(($1 * 5)) ] && util_show light
    done
    kill $L1 $L2
    wait $L1 $L2 2>/dev/null
    say "placement-light light=${l%,}"
}

# util_show WHAT: each CPU's CFS utilisation and the light tasks' (the scheduler's debugfs), what
# EAS weighs when it places a waking task.
util_show() {
    awk '/^cfs_rq\[[0-9]+\]:\/$/ { c = $1; sub(/^cfs_rq\[/, "", c); sub(/\].*/, "", c) }
         c != "" && $1 == ".util_avg" { u = u " cpu" c "=" $3; c = "" }
         END { print "VUC: util" u }' /sys/kernel/debug/sched/debug 2>/dev/null
    for p in $L1 $L2; do
        read -r _u <"/proc/$p/sched" 2>/dev/null
        say "util-task pid=$p $(grep -E 'se.avg.util_(avg|est)' "/proc/$p/sched" 2>/dev/null | tr -s ' ' | tr '\n' ' ') $1"
    done
}

# topo_change SECS PLACEMENT_SECS: say "wait-topology-change" (the test
# re-pins the VM: the device announces new domains), wait until some
# cpu_capacity changes, then show the new capacities, domains and policies
# and check placement again.
capacities() { cat /sys/devices/system/cpu/cpu[0-9]*/cpu_capacity 2>/dev/null | tr '\n' ','; }
topo_change() {
    before=$(capacities)
    say "wait-topology-change capacity=$before"
    n=0
    while [ "$(capacities)" = "$before" ] && [ $n -lt $(($1 * 10)) ]; do
        usleep 100000
        n=$((n + 1))
    done
    sleep 1    # schedutil's start on the new policies rebuilds the domains from a work item
    topo_show remapped
    policies remapped
    stats remapped
    placement "$2"
}

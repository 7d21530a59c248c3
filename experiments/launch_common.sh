# Shared by experiments/{tpu,gpu}/launch.sh: `--dry-run` prints the plan for the configured
# topology and the command each host would run; otherwise every host runs the command.
# Expects PY, PRESET, MESH, HOSTS, DEVICES_PER_HOST, DEVICE_MEMORY_GIB, EXTRA and TRAIN.
jmoe_launch() {
    if [[ "${1:-}" == "--dry-run" ]]; then
        local sets=()
        for ((i = 0; i < ${#EXTRA[@]}; i++)); do
            if [[ "${EXTRA[i]}" == "--set" ]]; then sets+=(--set "${EXTRA[i + 1]}"); fi
        done
        "$PY" -m jmoe.cli plan --preset "$PRESET" --mesh "$MESH" --hosts "$HOSTS" \
            --devices-per-host "$DEVICES_PER_HOST" --device-memory-gib "$DEVICE_MEMORY_GIB" "${sets[@]}"
        echo
        echo "each of the $HOSTS hosts runs: jmoe train ${TRAIN[*]:4}"
        return 0
    fi
    exec "${TRAIN[@]}"
}

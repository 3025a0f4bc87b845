#!/bin/sh
# Entry point of the valuerank image.
#
# Spark on Kubernetes (spark-submit to k8s://, or the Spark operator) starts the driver pod with
# the arguments "driver ..." and executor pods with "executor". This script runs both with the
# Spark that the pyspark wheel installed. Any other command runs as given, e.g.
# "python -m launch node ..." in the training pods.
#
# NOTE: written against the pod environment that Spark 4 sets (SPARK_DRIVER_BIND_ADDRESS,
# SPARK_EXECUTOR_* and SPARK_JAVA_OPT_* variables) and not run on a cluster here.
set -eu

case "${1:-}" in
driver)
    shift
    exec "$SPARK_HOME/bin/spark-submit" \
        --conf "spark.driver.bindAddress=${SPARK_DRIVER_BIND_ADDRESS}" \
        --deploy-mode client \
        "$@"
    ;;
executor)
    shift
    # Spark passes the executor's JVM options as SPARK_JAVA_OPT_0, SPARK_JAVA_OPT_1, ... in order.
    set --
    index=0
    while value=$(printenv "SPARK_JAVA_OPT_$index"); do
        set -- "$@" "$value"
        index=$((index + 1))
    done
    exec java \
        -Xms"${SPARK_EXECUTOR_MEMORY}" -Xmx"${SPARK_EXECUTOR_MEMORY}" \
        "$@" \
        -cp "${SPARK_CONF_DIR:-/opt/spark/conf}:$SPARK_HOME/jars/*" \
        org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
        --driver-url "$SPARK_DRIVER_URL" \
        --executor-id "$SPARK_EXECUTOR_ID" \
        --cores "$SPARK_EXECUTOR_CORES" \
        --app-id "$SPARK_APPLICATION_ID" \
        --hostname "$SPARK_EXECUTOR_POD_IP" \
        --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID:-0}" \
        --podName "${SPARK_EXECUTOR_POD_NAME:-}"
    ;;
*)
    exec "$@"
    ;;
esac

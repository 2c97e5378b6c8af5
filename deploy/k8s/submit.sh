#!/usr/bin/env bash
# Submit a job file to the cluster of deploy/k8s as a Kubernetes Job:
#
#   deploy/k8s/submit.sh JOBFILE [kubectl options, e.g. -n NAMESPACE]
#
# makes the ConfigMap NAME (key job.yaml: the file) and the Job NAME of
# deploy/k8s/submit.yaml reading it, NAME = pscluster-submit-DATE-TIME-RANDOM,
# so submissions never collide. The ConfigMap is then owned by the Job: it
# goes when the Job does (ttlSecondsAfterFinished, or kubectl delete job).
# Prints NAME; then follow the job and get its result with
#
#   kubectl logs -f job/NAME
#   kubectl wait --for=condition=complete job/NAME --timeout=2h   (exit 0: the job succeeded)
#
# A bad job file fails the Job at once, its log naming the field
# (README.md, "The job file").
set -euo pipefail
file=${1:?usage: submit.sh JOBFILE [kubectl options]}
shift
[[ -f $file ]] || { echo "submit.sh: no file $file" >&2; exit 1; }
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
name=pscluster-submit-$(date -u +%Y%m%d-%H%M%S)-$(printf '%04x' $((RANDOM % 65536)))

kubectl create configmap "$name" --from-file=job.yaml="$file" "$@" >/dev/null
# submit.yaml with its two names replaced: the Job's and the ConfigMap it reads.
uid=$(sed -e "s/^  name: pscluster-submit\$/  name: $name/" \
          -e "s/^            name: pscluster-job\$/            name: $name/" "$here/submit.yaml" \
      | kubectl create "$@" -f - -o 'jsonpath={.metadata.uid}')
kubectl patch configmap "$name" "$@" --type merge -p \
  "{\"metadata\":{\"ownerReferences\":[{\"apiVersion\":\"batch/v1\",\"kind\":\"Job\",\"name\":\"$name\",\"uid\":\"$uid\"}]}}" \
  >/dev/null
echo "$name"

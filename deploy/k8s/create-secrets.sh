#!/usr/bin/env bash
# Create (or update) the Kubernetes Secrets of deploy/k8s from a key dir that
# `psctl keys generate DIR --role ROLE` wrote:
#
#   pscluster-public-ROLE   every public key DIR/ROLE/*.key        (mounted in every pod)
#   pscluster-keys-ROLE     every secret key DIR/ROLE/*.key_secret (only in ROLE's pods;
#                                                                   admin: only the submit Job)
#
#   deploy/k8s/create-secrets.sh DIR [kubectl options, e.g. -n NAMESPACE]
#
# Each Secret is `kubectl create secret generic NAME --from-file=FILE ...`,
# applied so that running this again replaces the Secrets' contents (key
# rotation: README.md, "Security"). Daemons read keys when they start:
# restart them afterwards.
set -euo pipefail
dir=${1:?usage: create-secrets.sh KEYDIR [kubectl options]}
shift
shopt -s nullglob
for role in admin scheduler server worker; do
  for kind in public keys; do
    if [[ $kind == public ]]; then files=("$dir/$role"/*.key); else files=("$dir/$role"/*.key_secret); fi
    if (( ${#files[@]} == 0 )); then
      echo "no $kind key in $dir/$role: run psctl keys generate $dir --role $role" >&2
      exit 1
    fi
    kubectl create secret generic "pscluster-$kind-$role" "${files[@]/#/--from-file=}" \
      --dry-run=client -o yaml "$@" | kubectl apply "$@" -f -
  done
done

#!/usr/bin/env bash
# The main job, end to end on the embedded default (what ./setup.sh runs last):
#
#   deploy/demo-stack.sh [STATE_DIR]     (default: ./state)
#
# 1. starts the local stack (Orthanc as the PACS + `dicomnode serve` with SQLite and a local spool) on loopback;
# 2. makes a synthetic abdominal CT study (a localizer, a 5 mm bone-kernel series, a 3 mm soft series);
# 3. sends it with dcmtk's storescu into Orthanc, exactly as a modality would;
# 4. Orthanc auto-routes the CT series to the node, the node picks the 3 mm soft series, measures T11-L5 and sends
#    a TID 1500 SR and overlay images back into the same study;
# 5. waits until the SR is in Orthanc (found by QIDO-RS), prints the result and where to look, with a link that
#    opens the SR in the bundled viewer (OHIF, when ./setup.sh installed it into .ohif/).
#
# The stack stays up so you can look around; stop it with `deploy/local-stack.sh down STATE_DIR`.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
STATE="${1:-$REPO/state}"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
ORTHANC_HTTP_PORT=${ORTHANC_HTTP_PORT:-8042}
ORTHANC_DICOM_PORT=${ORTHANC_DICOM_PORT:-4242}
NODE_HTTP_PORT=${NODE_HTTP_PORT:-8000}
OHIF_PORT=${OHIF_PORT:-3000}
TIMEOUT=${DEMO_TIMEOUT:-180}
PY="$REPO/.venv/bin/python"
DN="$REPO/.venv/bin/dicomnode"

if [[ -z "${DICOMNODE_ADMIN_PASSWORD:-}" ]]; then
  if [[ -f "$STATE/admin-password" ]]; then
    DICOMNODE_ADMIN_PASSWORD=$(cat "$STATE/admin-password")
  else
    DICOMNODE_ADMIN_PASSWORD=$("$PY" -c "import secrets; print(secrets.token_urlsafe(12))")
    (umask 077 && echo "$DICOMNODE_ADMIN_PASSWORD" >"$STATE/admin-password")
  fi
fi
export DICOMNODE_ADMIN_PASSWORD

"$REPO/deploy/local-stack.sh" up "$STATE"

echo "demo: making a synthetic CT study (localizer, 5 mm bone kernel, 3 mm soft kernel)"
rm -rf "$STATE/demo-study"
"$DN" phantom --out "$STATE/demo-study" --study --matrix 320 --spacing 1.1 --thickness 1 --seed 7 >/dev/null
study_uid=$("$PY" - "$STATE/demo-study" <<'PY'
import sys, pathlib, pydicom
f = next(p for p in sorted(pathlib.Path(sys.argv[1]).rglob("*.dcm")))
print(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)
PY
)

echo "demo: storescu -> Orthanc (AET ORTHANC, port $ORTHANC_DICOM_PORT)"
# dcmtk storescu by path: an activated .venv has pynetdicom's own storescu first on PATH
TCP_NODELAY=1 /usr/bin/storescu -q -aet MODALITY -aec ORTHANC +sd +r 127.0.0.1 "$ORTHANC_DICOM_PORT" "$STATE/demo-study/study"

echo "demo: waiting for the node's SR to arrive in the study (Orthanc routes after its stable age, the node after its quiet period)"
t0=$SECONDS
qido="http://127.0.0.1:$ORTHANC_HTTP_PORT/dicom-web/studies/$study_uid/series"
until curl -fsS "$qido" 2>/dev/null | grep -q '"SR"'; do
  if ((SECONDS - t0 > TIMEOUT)); then
    echo "demo: no SR after ${TIMEOUT}s; see $STATE/logs/node.log and the admin UI" >&2
    exit 1
  fi
  sleep 1
done
sleep 2 # let the overlay images that follow the SR land too
echo "demo: SR arrived after $((SECONDS - t0)) s. Series now in the study:"
curl -fsS "$qido" >"$STATE/demo-series.json"
"$PY" - "$STATE/demo-series.json" <<'PY'
import json, sys
def get(s, tag):
    return (s.get(tag, {}).get("Value") or [""])[0]
series = json.load(open(sys.argv[1]))
for s in sorted(series, key=lambda s: int(get(s, "00200011") or 0)):
    print(f"  {get(s, '00080060'):3s} series {get(s, '00200011'):>5}  {get(s, '0008103E')}  ({get(s, '00201209')} instances)")
PY
sr_series=$("$PY" - "$STATE/demo-series.json" <<'PY'
import json, sys
for s in json.load(open(sys.argv[1])):
    if (s.get("00080060", {}).get("Value") or [""])[0] == "SR":
        print(s["0020000E"]["Value"][0])
        break
PY
)
result=$(find "$STATE/node-data/results" -name result.json -printf "%T@ %p\n" 2>/dev/null | sort -rn | head -n 1 | cut -d" " -f2- || true)
if [[ -n "$result" ]]; then
  "$PY" - "$result" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s = r.get("summary") or {}
def num(x):
    return "n/a" if x is None else f"{x:.1f}"
print(f"demo: result: {r['status']}; L1-L2 vBMD {num(s.get('vbmd_l1_l2_mg_cm3'))} mg/cm3 -> {s.get('category')}; "
      f"L1 {num(s.get('l1_hu'))} HU; contrast {s.get('contrast_phase')}")
for v in r.get("vertebrae", []):
    flag = " (level uncertain)" if v["level_uncertain"] else ""
    flag += f" excluded: {v.get('exclusion_reason')}" if v["excluded"] else ""
    print(f"  {v['level']:>3}  {v['trabecular_hu_mean']:7.1f} HU  {num(v['vbmd_mg_cm3']):>6} mg/cm3{flag}")
PY
fi
viewer="not installed (./setup.sh --no-demo installs OHIF into .ohif/, then deploy/local-stack.sh up $STATE)"
if curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$OHIF_PORT/app-config.js" 2>/dev/null; then
  viewer="http://127.0.0.1:$OHIF_PORT/viewer?StudyInstanceUIDs=$study_uid&initialSeriesInstanceUID=$sr_series"
fi
cat <<EOF

Where to look:
  The report in a viewer (OHIF, each vertebra's ROI and vBMD on its image; overlays in the study's series list):
                            $viewer
  PACS (Orthanc Explorer):  http://127.0.0.1:$ORTHANC_HTTP_PORT/app/explorer.html
                            -> patient PHANTOM^ABDOMEN -> study "CT ABDOMEN PHANTOM" -> series "dicomnode BMD overlay" (images) and the SR
  dicomnode admin UI:       http://127.0.0.1:$NODE_HTTP_PORT/  (user admin, password in $STATE/admin-password
                            unless you set DICOMNODE_ADMIN_PASSWORD)
  True densities of the synthetic study: $STATE/demo-study/truth.json
Stop the stack:  deploy/local-stack.sh down $STATE
EOF

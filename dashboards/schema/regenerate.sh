#!/bin/sh
# Regenerate dashboard.schema.json (the JSON Schema of Grafana 11.6's dashboard model) from the npm
# package @grafana/schema, in a throw-away directory: nothing from npm is committed but the schema.
# Strict: no --additional-properties, so a misspelt or unknown key fails validation.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
npm init -y >/dev/null
npm install --silent --no-audit --no-fund ts-json-schema-generator@2.4.0 @grafana/schema@11.6.0
npx ts-json-schema-generator \
  --path node_modules/@grafana/schema/dist/esm/raw/dashboard/x/dashboard_types.gen.d.ts \
  --type Dashboard --no-type-check -o "$here/dashboard.schema.json"
echo "wrote $here/dashboard.schema.json"

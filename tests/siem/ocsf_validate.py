"""Validates OCSF JSON lines against the OCSF JSON schema of their class.

    ocsf_validate.py VERSION FILE...

Each line must be one OCSF event of release VERSION; its class (class_uid) and profiles
(metadata.profiles) pick the schema, which the pinned `ocsf-json-schema` package builds from
its copy of that OCSF release (unknown attributes are refused). Prints one line per invalid
record (file:line: the errors) and `N valid` at the end; exits 1 if any record is invalid or
there are none.
"""

import json
import sys

import jsonschema
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    version, files = sys.argv[1], sys.argv[2:]
    ocsf = OcsfJsonSchemaEmbedded(get_ocsf_schema(version=version))
    validators = {}
    valid = invalid = 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    event = json.loads(line)
                    got = event["metadata"]["version"]
                    if got != version:
                        raise ValueError(f"metadata.version is {got}, not {version}")
                    class_name = ocsf.lookup_class_name_from_uid(class_uid=event["class_uid"])
                    profiles = tuple(sorted(event["metadata"].get("profiles", [])))
                    key = (class_name, profiles)
                    if key not in validators:
                        schema = ocsf.get_class_schema(class_name=class_name, profiles=list(profiles))
                        validators[key] = jsonschema.Draft202012Validator(
                            schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
                        )
                    errors = sorted(validators[key].iter_errors(event), key=lambda e: list(e.path))
                    if errors:
                        raise ValueError(
                            "; ".join(
                                f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                                for e in errors[:10]
                            )
                        )
                    valid += 1
                except Exception as e:  # noqa: BLE001 - every failure is reported per line
                    invalid += 1
                    print(f"{where}: {type(e).__name__}: {e}")
    print(f"{valid} valid, {invalid} invalid")
    return 0 if invalid == 0 and valid > 0 else 1


if __name__ == "__main__":
    sys.exit(main())

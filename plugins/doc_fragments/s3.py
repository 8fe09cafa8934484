# Copyright: (c) 2026, pgops.online_backup contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations


class ModuleDocFragment:
    # The options of modules that reach an s3:// repository (module_utils/_s3.S3_OPTION_SPEC).
    DOCUMENTATION = r"""
options:
  s3_endpoint:
    description: The S3 endpoint URL of an C(s3://bucket/prefix) repository (empty for AWS); path-style addressing is used.
    type: str
  s3_region:
    description: The S3 region.
    type: str
    default: us-east-1
  s3_access_key:
    description:
      - The S3 access key. Without O(s3_access_key) and O(s3_secret_key), boto3's own chain is used
        (C(AWS_ACCESS_KEY_ID)/C(AWS_SECRET_ACCESS_KEY), O(s3_profile) or C(AWS_PROFILE)).
    type: str
  s3_secret_key:
    description: The S3 secret key.
    type: str
  s3_ca_bundle:
    description: A PEM file of the CA that signed the endpoint's certificate.
    type: path
  s3_verify_tls:
    description: Verify the endpoint's TLS certificate.
    type: bool
    default: true
  s3_profile:
    description: An AWS profile name for the credentials.
    type: str
requirements:
  - boto3 on the managed node for an s3:// repository (Debian package python3-boto3)
"""

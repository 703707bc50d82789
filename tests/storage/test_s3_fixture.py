"""The SeaweedFS fixture: signed round trip, authentication enforced, conditional create."""

from __future__ import annotations

import boto3
import pytest
from botocore.exceptions import ClientError

from tests.fixtures.s3 import S3Bucket


def test_object_round_trips(s3_server: S3Bucket) -> None:
    client = s3_server.client()
    body = bytes(range(256)) * 1000
    client.put_object(Bucket=s3_server.bucket, Key=s3_server.key("a/b"), Body=body)
    got = client.get_object(Bucket=s3_server.bucket, Key=s3_server.key("a/b"))["Body"].read()
    assert got == body
    assert s3_server.repo_url("p") == f"s3://{s3_server.bucket}/{s3_server.prefix}/p"


def test_wrong_secret_is_refused(s3_server: S3Bucket) -> None:
    bad = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key="wrong" + s3_server.secret_key,
        region_name="us-east-1",
    )
    with pytest.raises(ClientError) as info:
        bad.put_object(Bucket=s3_server.bucket, Key=s3_server.key("x"), Body=b"x")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_if_none_match_refuses_overwrite(s3_server: S3Bucket) -> None:
    client = s3_server.client()
    client.put_object(
        Bucket=s3_server.bucket, Key=s3_server.key("c"), Body=b"first", IfNoneMatch="*"
    )
    with pytest.raises(ClientError) as info:
        client.put_object(
            Bucket=s3_server.bucket, Key=s3_server.key("c"), Body=b"second", IfNoneMatch="*"
        )
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    got = client.get_object(Bucket=s3_server.bucket, Key=s3_server.key("c"))["Body"].read()
    assert got == b"first"

"""The region pyarrow (Ray's checkpoints and run folders) addresses a bucket in, for every case:
pyarrow does not follow S3's redirects to a bucket's region, so a wrong one fails at the first
write, after every boto3 check has passed. And what `pipeline submit` sends a job about it."""
from __future__ import annotations

import pytest

from pipeline.ops.submit import job_env
from pipeline.storage import S3Settings, is_aws_endpoint, pyarrow_region


def resolver(region="us-west-2", fails=False):
    asked = []

    def resolve(bucket):
        asked.append(bucket)
        if fails:
            raise OSError("no answer")
        return region
    resolve.asked = asked
    return resolve


@pytest.mark.parametrize("endpoint, aws", [
    (None, True), ("", True), ("https://s3.amazonaws.com", True),
    ("https://s3.us-west-2.amazonaws.com", True), ("s3.eu-central-1.amazonaws.com", True),
    ("https://s3.cn-north-1.amazonaws.com.cn", True),
    ("http://127.0.0.1:8333", False), ("https://minio.example.org", False),
    ("https://amazonaws.com.evil.example", False), ("http://localhost:9000", False)])
def test_which_endpoints_are_aws(endpoint, aws):
    assert is_aws_endpoint(endpoint) is aws


def test_aws_without_a_region_asks_for_the_buckets_own():
    resolve = resolver("us-west-2")
    assert pyarrow_region(None, None, "runs-bucket", resolve) == "us-west-2"
    assert pyarrow_region(None, "https://s3.amazonaws.com", "runs-bucket", resolve) == "us-west-2"
    assert resolve.asked == ["runs-bucket", "runs-bucket"]


def test_a_region_given_is_used_and_nothing_is_asked():
    resolve = resolver()
    assert pyarrow_region("eu-west-1", None, "b", resolve) == "eu-west-1"
    assert pyarrow_region("eu-west-1", "http://127.0.0.1:8333", "b", resolve) == "eu-west-1"
    assert resolve.asked == []


def test_a_custom_endpoint_keeps_the_default_and_is_never_asked():
    resolve = resolver()
    assert pyarrow_region(None, "http://127.0.0.1:8333", "b", resolve) == "us-east-1"
    assert pyarrow_region(None, "https://minio.example.org", "b", resolve) == "us-east-1"
    assert resolve.asked == []


def test_no_bucket_or_no_answer_falls_back_to_us_east_1_in_words(capsys):
    assert pyarrow_region(None, None, None, resolver()) == "us-east-1"
    assert pyarrow_region(None, None, "b", resolver(fails=True)) == "us-east-1"
    err = capsys.readouterr().err
    assert "[s3] warning: the region of bucket b could not be found" in err
    assert "AWS_DEFAULT_REGION" in err


def test_the_filesystem_ray_gets_is_in_the_buckets_region():
    fs = S3Settings().pyarrow_filesystem("runs-bucket", resolve=resolver("ap-south-1"))
    assert fs.region == "ap-south-1"
    fs = S3Settings(endpoint_url="http://127.0.0.1:8333").pyarrow_filesystem(
        "b", resolve=resolver(fails=True))
    assert fs.region == "us-east-1"


def test_submit_sends_a_region_only_with_its_endpoint():
    """On AWS the laptop's default region is not the bucket's: the job finds the bucket's."""
    aws = {"AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
           "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    env, _ = job_env(aws)
    assert env == {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    custom = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1",
              "AWS_SECRET_ACCESS_KEY": "s"}
    env, held = job_env(custom)
    assert env == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_DEFAULT_REGION": "eu-west-1"}
    assert held == ["AWS_SECRET_ACCESS_KEY"]
    env, _ = job_env({"AWS_ENDPOINT_URL_S3": "http://minio:9000", "AWS_REGION": "eu-west-1"})
    assert env == {"AWS_ENDPOINT_URL_S3": "http://minio:9000", "AWS_REGION": "eu-west-1"}

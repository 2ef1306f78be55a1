"""Services, handler registration and how the CLI finds a service by name."""
import pytest

from amqprpc import Service
from amqprpc.ops.loading import ServiceNotFound, load_service
from amqprpc.service import snake_case


@pytest.mark.parametrize("name, expected", [("getUser", "get_user"), ("get_user", "get_user"),
                                            ("validateToken", "validate_token"), ("ping", "ping"),
                                            ("getUserV2", "get_user_v2")])
def test_camel_case_maps_to_snake_case(name, expected):
    assert snake_case(name) == expected


def test_handler_name_defaults_to_the_function_name_and_finds_camel_case():
    service = Service("s")

    @service.handler
    def get_user(payload):
        return 1

    @service.handler("other")
    def something(payload):
        return 2

    assert service.find("get_user") is get_user
    assert service.find("getUser") is get_user
    assert service.find("other") is something
    assert service.find("missing") is None


def test_registering_an_action_twice_is_an_error():
    service = Service("s")
    service.handler("x")(lambda p: 1)
    with pytest.raises(ValueError, match="twice"):
        service.handler("x")(lambda p: 2)


def test_user_service_resolves_from_the_checkout_with_no_flags():
    assert load_service("user-service").name == "user-service"


def test_app_flag_overrides_lookup():
    from workers import user_service

    assert load_service("user-service", app="workers.user_service:service") is user_service.service


def test_unknown_service_names_what_was_tried():
    with pytest.raises(ServiceNotFound, match="workers.no_such_service"):
        load_service("no-such-service")

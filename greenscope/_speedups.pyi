from typing import Any, Callable, Optional, Type

class Fast:
    owner: Any
    value: Any
    def __init__(self, owner: object, value: Any) -> None: ...

class HotCall:
    __wrapped__: Callable[..., Any]
    fallback: Callable[..., Any]
    kind: int
    def __init__(
        self, fallback: Callable[..., Any], kind: int, wrapped: Optional[Callable[..., Any]] = None
    ) -> None: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def __get__(self, obj: Any, owner: Optional[type] = None) -> Any: ...

class HotProperty:
    __wrapped__: Callable[[Any], Any]
    fallback: Callable[[Any], Any]
    kind: int
    def __init__(
        self,
        fallback: Callable[[Any], Any],
        kind: int,
        wrapped: Optional[Callable[[Any], Any]] = None,
    ) -> None: ...
    def __get__(self, obj: Any, owner: Optional[type] = None) -> Any: ...

def setup(
    registry_class: Type[Any],
    getcurrent: Callable[[], Any],
    get_running_loop: Callable[[], Any],
    current_task: Callable[[Any], Any],
) -> None: ...

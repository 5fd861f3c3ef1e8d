"""Every public function, class and method of the tfadv package has a docstring of its own.

The test imports every module of the package (found with `pkgutil.walk_packages`; no module is
skipped, and one that fails to import fails the test) and checks:

- every public (no leading ``_``) function and class DEFINED in that module (its ``__module__``
  is the module, so a re-export such as ``tfadv.defenses.TRADES`` is counted once, where it is
  defined);
- every public method, static/class method and property in the class body (``vars(cls)``) of
  those classes. An override of a documented method of a base class (a Keras ``call``,
  ``train_step``, ``get_config``) inherits that documentation and passes; an override of an
  undocumented one, or a new method, needs its own.

A class counts by its own ``__doc__`` (not one inherited through ``inspect.getdoc``, and not the
``Name(field, ...)`` signature a dataclass or NamedTuple writes for itself). A docstring shorter
than `MIN_CHARS` characters counts as missing. Only imports: it takes the time TensorFlow takes
to import.
"""

import dataclasses
import importlib
import inspect
import pkgutil

import tensorflow as tf

import tfadv

MIN_CHARS = 10

# Modules that cannot be imported in the test process, with the reason. Empty: every module of
# tfadv imports without side effects; a module added here must say why.
SKIPPED_MODULES = {}


def _documented(doc):
    return doc is not None and len(doc.strip()) >= MIN_CHARS


def _function_of(attr):
    """The plain function behind a class-body or module attribute, or None if it is no function:
    unwraps staticmethod/classmethod, property (its getter) and ``tf.function``."""
    if isinstance(attr, (staticmethod, classmethod)):
        return attr.__func__
    if isinstance(attr, property):
        return attr.fget
    if inspect.isfunction(attr):
        return attr
    python_function = getattr(attr, "python_function", None)  # a tf.function
    if inspect.isfunction(python_function):
        return python_function
    return None


def _own_class_doc(cls):
    doc = vars(cls).get("__doc__")
    if doc and (dataclasses.is_dataclass(cls) or hasattr(cls, "_fields")):
        signature = doc.strip()
        if signature.startswith(cls.__name__ + "(") and signature.endswith(")") and \
                "\n" not in signature:
            return None  # written by @dataclass / NamedTuple, not by a person
    return doc


def _base_documents(cls, name):
    """Whether some base class of ``cls`` defines ``name`` with a docstring."""
    for base in cls.__mro__[1:]:
        if name in vars(base):
            attr = vars(base)[name]
            function = _function_of(attr)
            doc = function.__doc__ if function is not None else getattr(attr, "__doc__", None)
            if _documented(doc):
                return True
    return False


def _modules():
    """``(modules, import errors)`` of every module of the tfadv package."""
    modules, errors = [tfadv], []

    def onerror(name):
        errors.append(f"{name}: import failed")

    for info in pkgutil.walk_packages(tfadv.__path__, prefix="tfadv.", onerror=onerror):
        if info.name in SKIPPED_MODULES:
            continue
        try:
            modules.append(importlib.import_module(info.name))
        except Exception as err:  # noqa: BLE001 - reported as a failure below
            errors.append(f"{info.name}: import failed: {type(err).__name__}: {err}")
    return modules, errors


def public_names():
    """``(checked, missing, import errors)``: the dotted names of every public function, class and
    method checked, the ones without a docstring, and modules that failed to import."""
    modules, errors = _modules()
    checked, missing = [], []
    for module in modules:
        seen = set()
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or id(obj) in seen:
                continue
            is_class = inspect.isclass(obj)
            function = None if is_class else _function_of(obj)
            if not is_class and function is None:
                continue
            if getattr(obj, "__module__", None) != module.__name__:
                continue  # imported from elsewhere: checked where it is defined
            seen.add(id(obj))
            qualified = f"{module.__name__}.{name}"
            checked.append(qualified)
            doc = _own_class_doc(obj) if is_class else function.__doc__
            if not _documented(doc):
                missing.append(qualified)
            if is_class:
                for attr_name, attr in sorted(vars(obj).items()):
                    if attr_name.startswith("_"):
                        continue
                    method = _function_of(attr)
                    if method is None:
                        continue  # a class attribute (constant), not a method
                    checked.append(f"{qualified}.{attr_name}")
                    if not _documented(method.__doc__) and not _base_documents(obj, attr_name):
                        missing.append(f"{qualified}.{attr_name}")
    return checked, missing, errors


def test_docstring_rules_on_planted_classes():
    """The rules themselves: own class docstring, documented-base override, short docstring."""

    class Base:
        """A base with one documented and one undocumented method."""

        def documented(self):
            """Does the documented thing."""

        def undocumented(self):
            pass

    class Child(Base):
        def documented(self):  # inherits Base's documentation: fine
            pass

        def undocumented(self):  # the base has none to inherit: missing
            pass

        def short(self):
            """Short."""

    @dataclasses.dataclass
    class Record:
        x: int

    assert _own_class_doc(Child) is None  # not inherited from Base
    assert _own_class_doc(Record) is None  # dataclass's generated "Record(x: int)"
    assert _base_documents(Child, "documented")
    assert not _base_documents(Child, "undocumented")
    assert not _documented(Child.short.__doc__)
    assert _documented(Base.documented.__doc__)

    def traced(x):
        """A function compiled with tf.function."""
        return x

    assert _function_of(tf.function(traced)) is traced
    assert _function_of(staticmethod(traced)) is traced
    assert _function_of(property(traced)) is traced
    assert _function_of(42) is None


def test_every_public_name_has_a_docstring():
    checked, missing, errors = public_names()
    assert not errors, "\n".join(errors)
    assert len(checked) > 200, f"only {len(checked)} public names found: is the walk broken?"
    assert not missing, (f"{len(missing)} of {len(checked)} public functions, classes and methods "
                         f"of tfadv have no docstring (or one shorter than {MIN_CHARS} "
                         f"characters):\n" + "\n".join(missing))

"""Stand-ins for what cannot run in the test process: test doubles of the runtime's executors and
vendor code that needs a GPU or compiled libraries. A test that uses one is marked `uses_fake`
(tests/conftest.py adds the marker to every test whose module imports from here), and the run's
summary counts them."""

"""sockwatch's Grafana dashboards: the generator (build.py), the model check and
query helpers the tests share (model.py), and a matplotlib renderer (render.py)."""

"""Deployment artifacts: `deploy.render` turns a ServeConfig into a KubeRay RayService and Serve configs."""

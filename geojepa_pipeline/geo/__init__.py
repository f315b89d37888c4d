"""Pure geospatial code: OSM reading, the UTM grid, clipping, minimum boxes, rendering. No Dagster."""

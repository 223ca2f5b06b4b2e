"""Reading medical images and datasets: formats, layouts, slices, transforms, built-in data."""
